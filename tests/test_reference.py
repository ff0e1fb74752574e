"""The reference backend against SPEC.md: a per-token loop oracle, hand-computed cases, gradcheck, varlen."""
import math

import pytest
import torch

import nsa
from nsa.ops import reference

SMALL = nsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=3, window=6)


def make_inputs(B, T, Hq, Hkv, Dk, Dv, config, dtype=torch.float64, seed=0, seq_lens=None):
    """Random inputs of nsa_attention; with seq_lens, packed [1, sum, H, D] with per-sequence k_cmp."""
    g = torch.Generator().manual_seed(seed)
    Tc = config.num_cmp_tokens(T) if seq_lens is None else sum(config.num_cmp_tokens(n) for n in seq_lens)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    return dict(q=r(B, T, Hq, Dk), k_cmp=r(B, Tc, Hkv, Dk), v_cmp=r(B, Tc, Hkv, Dv),
                k_slc=r(B, T, Hkv, Dk), v_slc=r(B, T, Hkv, Dv), k_swa=r(B, T, Hkv, Dk), v_swa=r(B, T, Hkv, Dv),
                gates=torch.rand(B, T, Hq, 3, generator=g, dtype=dtype))


def attend(q, k, v, scale):
    """Plain softmax attention of one query q [D] over keys k [N, D]; zeros when N = 0."""
    if k.shape[0] == 0:
        return q.new_zeros(v.shape[-1]), q.new_zeros(0)
    p = torch.softmax(scale * (k @ q), dim=0)
    return p @ v, p


def naive_nsa(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale=None):
    """SPEC.md read literally: Python loops over batch, positions, heads and blocks. Returns (o, ids)."""
    B, T, Hq, Dk = q.shape
    Hkv, Dv = k_cmp.shape[2], v_cmp.shape[3]
    G = Hq // Hkv
    l, d, lp, n, w = config.cmp_block, config.cmp_stride, config.slc_block, config.num_selected, config.window
    scale = Dk ** -0.5 if scale is None else scale
    Tc, Nb = k_cmp.shape[1], math.ceil(T / lp)
    o = torch.zeros(B, T, Hq, Dv, dtype=q.dtype)
    ids = torch.full((B, T, Hkv, n), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            visible = [i for i in range(Tc) if i * d + l - 1 <= t]
            o_cmp, p_slc = [], torch.zeros(Hq, Nb, dtype=q.dtype)
            for h in range(Hq):
                out, p = attend(q[b, t, h], k_cmp[b, visible, h // G], v_cmp[b, visible, h // G], scale)
                o_cmp.append(out)
                for pi, i in zip(p, visible):
                    for j in range(Nb):
                        p_slc[h, j] += pi * max(0, min(i * d + l, (j + 1) * lp) - max(i * d, j * lp)) / d
            last = t // lp
            for kv in range(Hkv):
                score = p_slc[kv * G:(kv + 1) * G].sum(0)
                forced = [j for j in (last, last - 1, 0) if 0 <= j <= last]
                forced = list(dict.fromkeys(forced))
                others = sorted((j for j in range(last + 1) if j not in forced), key=lambda j: -float(score[j]))
                chosen = sorted((forced + others)[:n])
                ids[b, t, kv, :len(chosen)] = torch.tensor(chosen)
                slc_tokens = [u for j in chosen for u in range(j * lp, (j + 1) * lp) if u <= t]
                swa_tokens = list(range(max(0, t - w + 1), t + 1))
                for h in range(kv * G, (kv + 1) * G):
                    o_slc, _ = attend(q[b, t, h], k_slc[b, slc_tokens, kv], v_slc[b, slc_tokens, kv], scale)
                    o_swa, _ = attend(q[b, t, h], k_swa[b, swa_tokens, kv], v_swa[b, swa_tokens, kv], scale)
                    gt = gates[b, t, h]
                    o[b, t, h] = gt[0] * o_cmp[h] + gt[1] * o_slc + gt[2] * o_swa
    return o, ids


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("B,T,Hq,Hkv,Dk,Dv,config", [
    (2, 37, 4, 2, 8, 8, SMALL),                                  # odd T, G = 2
    (1, 45, 3, 3, 6, 5, SMALL),                                  # G = 1, Dk != Dv
    (1, 30, 16, 1, 4, 4, SMALL),                                 # G = 16
    (1, 41, 2, 1, 4, 3, nsa.NSAConfig(8, 4, 8, 2, 5)),           # l = l', n < 3 forced blocks
    (1, 50, 2, 2, 4, 4, nsa.NSAConfig(6, 2, 4, 4, 9)),           # l > l', l not a power of two
    (1, 300, 2, 1, 8, 8, nsa.NSAConfig()),                       # the paper's defaults, T < l' * n
])
def test_reference_matches_loop_oracle(B, T, Hq, Hkv, Dk, Dv, config):
    x = make_inputs(B, T, Hq, Hkv, Dk, Dv, config, seed=T)
    o = nsa.nsa_attention(**x, config=config, backend="reference")
    ids = nsa.select_blocks(x["q"], x["k_cmp"], config, backend="reference")
    o_ref, ids_ref = naive_nsa(*x.values(), config)
    assert torch.equal(ids, ids_ref)
    assert rel_err(o, o_ref) < 1e-12


def test_chunking_does_not_change_results(monkeypatch):
    x = make_inputs(2, 70, 4, 2, 8, 8, SMALL, seed=1)
    full = nsa.nsa_attention(**x, config=SMALL, backend="reference")
    monkeypatch.setattr(reference, "QUERY_CHUNK", 7)
    assert rel_err(nsa.nsa_attention(**x, config=SMALL, backend="reference"), full) < 1e-13


def test_overlap_weights_default_are_1_2_2_2_1():
    cfg = nsa.NSAConfig()
    W = reference.cmp_slc_overlap(num_cmp=40, num_blocks=11, config=cfg)
    # selection block 1 covers raw tokens [64, 128): compressed tokens 3..7 overlap it by 16, 32, 32, 32, 16
    assert W[:, 1].nonzero().flatten().tolist() == [3, 4, 5, 6, 7]
    assert W[3:8, 1].tolist() == [1, 2, 2, 2, 1]
    assert torch.all(W[:, 0][:4] == torch.tensor([2.0, 2.0, 2.0, 1.0]))  # block 0 has no token before it
    assert torch.all(W.sum(1) == cfg.cmp_block / cfg.cmp_stride)        # each token's l raw tokens land in blocks


def one_hot_values(B, T, H):
    """v[b, u, h] = e_u: the output of attention is then the attention distribution itself."""
    return torch.eye(T, dtype=torch.float64).expand(B, H, T, T).transpose(1, 2).contiguous()


def gated(x, which):
    g = torch.zeros_like(x["gates"])
    g[..., which] = 1.0
    return {**x, "gates": g}


def test_short_sequence_has_zero_compressed_branch():
    cfg = nsa.NSAConfig()  # l = 32
    x = make_inputs(1, 31, 2, 1, 8, 8, cfg)
    assert x["k_cmp"].shape[1] == 0
    o = nsa.nsa_attention(**gated(x, 0), config=cfg)
    assert torch.equal(o, torch.zeros_like(o))
    # all candidate blocks (just block 0 here) are selected; the rest of the slots are -1
    ids = nsa.select_blocks(x["q"], x["k_cmp"], cfg)
    assert torch.all(ids[..., 0] == 0) and torch.all(ids[..., 1:] == -1)


def test_window_edges():
    B, T, w = 1, 20, 6
    cfg = nsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=8, num_selected=3, window=w)
    x = make_inputs(B, T, 2, 1, 4, T, cfg)
    x.update(k_swa=torch.zeros_like(x["k_swa"]), v_swa=one_hot_values(B, T, 1))
    o = nsa.nsa_attention(**gated(x, 2), config=cfg)
    for t in range(T):
        lo = max(0, t - w + 1)
        expected = torch.zeros(T, dtype=torch.float64)
        expected[lo:t + 1] = 1.0 / (t + 1 - lo)  # equal keys: uniform over exactly [t - w + 1, t]
        assert torch.allclose(o[0, t, 0], expected, atol=1e-14), t


def test_selected_branch_is_causal_inside_the_current_block():
    B, T = 1, 24
    x = make_inputs(B, T, 1, 1, 4, T, SMALL)
    x.update(k_slc=torch.zeros_like(x["k_slc"]), v_slc=one_hot_values(B, T, 1))
    o = nsa.nsa_attention(**gated(x, 1), config=SMALL)
    ids = nsa.select_blocks(x["q"], x["k_cmp"], SMALL)
    for t in range(T):
        tokens = [u for j in ids[0, t, 0].tolist() if j >= 0 for u in range(j * 8, j * 8 + 8) if u <= t]
        expected = torch.zeros(T, dtype=torch.float64)
        expected[tokens] = 1.0 / len(tokens)
        assert torch.allclose(o[0, t, 0], expected, atol=1e-14), t


def test_forced_blocks_and_top_scoring_block():
    """Queries that only like compressed tokens inside block 3 pick it beside the forced 0, J - 1, J."""
    cfg = nsa.NSAConfig(num_selected=4)
    T, D = 512, 8
    Tc = cfg.num_cmp_tokens(T)
    q = torch.zeros(1, T, 1, D, dtype=torch.float64)
    q[..., 0] = 1.0
    k_cmp = torch.zeros(1, Tc, 1, D, dtype=torch.float64)
    k_cmp[0, 12:15, 0, 0] = 50.0  # tokens 12..14 cover raw [192, 256): all inside block 3
    ids = nsa.select_blocks(q, k_cmp, cfg)
    assert ids[0, T - 1, 0].tolist() == [0, 3, 6, 7]  # J = 7: forced 0, 6, 7 plus the best, 3
    assert ids[0, 100, 0].tolist() == [0, 1, -1, -1]  # J = 1: only two candidates exist
    assert ids[0, 255, 0].tolist() == [0, 1, 2, 3]    # J = 3: all four candidates fit


def test_more_slots_than_blocks():
    cfg = nsa.NSAConfig()  # n = 16, l' = 64
    x = make_inputs(1, 100, 2, 1, 8, 8, cfg)
    ids = nsa.select_blocks(x["q"], x["k_cmp"], cfg)
    assert ids[0, 99, 0].tolist() == [0, 1] + [-1] * 14
    assert ids[0, 10, 0].tolist() == [0] + [-1] * 15


def test_gqa_group_shares_one_selection():
    """With G = 16 the selection follows the sum over the group's heads, not any single head."""
    x = make_inputs(1, 40, 16, 1, 4, 4, SMALL, seed=3)
    o, ids_naive = naive_nsa(*x.values(), SMALL)
    assert torch.equal(nsa.select_blocks(x["q"], x["k_cmp"], SMALL), ids_naive)
    assert ids_naive.shape == (1, 40, 1, 3)


def test_packed_varlen_equals_each_sequence_alone():
    lens = [5, 37, 0, 22]
    T = sum(lens)
    x = make_inputs(1, T, 4, 2, 8, 6, SMALL, seq_lens=lens)
    cu = torch.tensor([0, 5, 42, 42, 64], dtype=torch.int32)
    o = nsa.nsa_attention(**x, config=SMALL, cu_seqlens=cu)
    ids = nsa.select_blocks(x["q"], x["k_cmp"], SMALL, cu_seqlens=cu)
    start = start_c = 0
    for n in lens:
        nc = SMALL.num_cmp_tokens(n)
        alone = {k: v[:, start_c:start_c + nc] if k in ("k_cmp", "v_cmp") else v[:, start:start + n]
                 for k, v in x.items()}
        if n:
            assert torch.equal(o[:, start:start + n], nsa.nsa_attention(**alone, config=SMALL))
            assert torch.equal(ids[:, start:start + n], nsa.select_blocks(alone["q"], alone["k_cmp"], SMALL))
        start, start_c = start + n, start_c + nc


def test_half_precision_close_to_float64():
    x = make_inputs(1, 50, 4, 2, 16, 16, SMALL, seed=5)
    o64 = nsa.nsa_attention(**x, config=SMALL)
    o16 = nsa.nsa_attention(**{k: v.half() for k, v in x.items()}, config=SMALL)
    assert o16.dtype == torch.float16 and rel_err(o16.double(), o64) < 2e-3


def test_gradcheck_every_input():
    cfg = nsa.NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, window=5)
    x = make_inputs(1, 13, 2, 1, 3, 2, cfg, seed=11)
    names = list(x)
    inputs = tuple(v.requires_grad_() for v in x.values())

    def f(*args):
        return nsa.nsa_attention(*args, config=cfg, backend="reference")

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)
    out = f(*inputs)
    grads = torch.autograd.grad(out.sum(), inputs)
    for name, g in zip(names, grads):
        assert g.abs().sum() > 0, f"no gradient reaches {name}"


def test_cmp_attention_weights_are_the_compressed_branch():
    # the weights times v_cmp give the compressed branch's output, and each row sums to 1 over what it sees (0 early)
    cfg, G = SMALL, 2
    x = make_inputs(2, 23, 4, 2, 8, 5, cfg)
    positions = torch.arange(23)
    p = reference.cmp_attention_weights(x["q"], x["k_cmp"], positions, cfg, 8 ** -0.5)  # [B, T, Hq, Tc]
    o_cmp = torch.einsum("bthc,bchd->bthd", p, x["v_cmp"].repeat_interleave(G, dim=2))
    o = nsa.nsa_attention(**gated(x, 0), config=cfg)
    assert torch.allclose(o_cmp, o, atol=1e-12)
    sees = positions >= cfg.cmp_block - 1
    assert torch.allclose(p.sum(-1)[:, sees], torch.ones(()).double()) and torch.equal(p[:, ~sees], p[:, ~sees] * 0)
    # one position alone gives the same row
    assert torch.equal(reference.cmp_attention_weights(x["q"][:, 9:10], x["k_cmp"], positions[9:10], cfg, 8 ** -0.5),
                       p[:, 9:10])
