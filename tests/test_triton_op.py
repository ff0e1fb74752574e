"""The whole op with backend='triton' against the PyTorch reference (SPEC.md).

Block selection is discrete and may legitimately differ on near-ties, so the op is checked in two ways:
  * the selection itself: nsa.select_blocks(triton) equals the float64 reference on (nearly) all rows;
  * the output and all eight gradients against a float64 reference that uses the triton selection
    (built from the reference's own branch functions), so that a tie cannot make the test flaky.
"""
import pytest
import torch

import nsa
from nsa import NSAConfig
from nsa.ops import reference as ref

CFG_A = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=24)
CFG_B = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, window=40)
CFG_C = NSAConfig(cmp_block=64, cmp_stride=64, slc_block=128, num_selected=2, window=30)  # d = l = 64, n < 3
CONFIG_NAMES = {CFG_A: "A", CFG_B: "B", CFG_C: "C", NSAConfig(): "default"}


def make_inputs(B, T, Hkv, G, Dk, Dv, config, dtype=torch.float32, seq_lens=None, device="cpu", seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    Tc = sum(config.num_cmp_tokens(n) for n in seq_lens) if seq_lens else config.num_cmp_tokens(T)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    return dict(q=rand(B, T, Hkv * G, Dk), k_cmp=rand(B, Tc, Hkv, Dk), v_cmp=rand(B, Tc, Hkv, Dv),
                k_slc=rand(B, T, Hkv, Dk), v_slc=rand(B, T, Hkv, Dv), k_swa=rand(B, T, Hkv, Dk),
                v_swa=rand(B, T, Hkv, Dv), gates=torch.sigmoid(rand(B, T, Hkv * G, 3)))


NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates")


def _reference_dense(x, ids, config, scale):
    """SPEC.md's output for one dense batch, given the block ids [B, T, Hkv, n] (chunked over queries)."""
    B, T, Hq, _ = x["q"].shape
    Hkv = x["k_cmp"].shape[2]
    qh = ref._heads_first(x["q"]).unflatten(1, (Hkv, Hq // Hkv))
    gh = ref._heads_first(x["gates"]).unflatten(1, (Hkv, Hq // Hkv))
    kc, vc, ks, vs, kw, vw = (ref._heads_first(x[n]) for n in NAMES[1:7])
    idh = ids.transpose(1, 2)  # [B, Hkv, T, n]
    outs = []
    for t in ref._chunks(T, x["q"].device):
        qc, gc = qh[:, :, :, t], gh[:, :, :, t]
        o_cmp = ref._cmp_attention(qc, kc, vc, t, config, scale)[1]
        o_slc = ref._slc_attention(qc, ks, vs, idh[:, :, t], t, config, scale)
        o_swa = ref._swa_attention(qc, kw, vw, t, config, scale)
        outs.append(gc[..., 0:1] * o_cmp + gc[..., 1:2] * o_slc + gc[..., 2:3] * o_swa)
    return torch.cat(outs, dim=3).flatten(1, 2).transpose(1, 2)


def reference_given_ids(x, ids, config, scale, seq_lens=None):
    """o [B, T, Hq, Dv] computed by the reference's branch functions with the given selection."""
    if seq_lens is None:
        return _reference_dense(x, ids.long(), config, scale)
    outs, start, start_c = [], 0, 0
    for n in seq_lens:
        nc = config.num_cmp_tokens(n)
        if n:
            part = {k: (v[:, start_c:start_c + nc] if k in ("k_cmp", "v_cmp") else v[:, start:start + n])
                    for k, v in x.items()}
            outs.append(_reference_dense(part, ids[:, start:start + n].long(), config, scale))
        start, start_c = start + n, start_c + nc
    return torch.cat(outs, dim=1)


def cu_of(seq_lens, device="cpu"):
    return None if seq_lens is None else torch.tensor([0] + seq_lens, device=device).cumsum(0).to(torch.int32)


def check_op(x, config, seq_lens=None, tol=1e-4, min_match=0.97, seed=1):
    """Runs the triton op forward + backward and compares with the float64 reference; returns the grads."""
    scale = x["q"].shape[-1] ** -0.5
    cu = cu_of(seq_lens, x["q"].device)
    x64 = {k: v.detach().double() for k, v in x.items()}

    ids = nsa.select_blocks(x["q"], x["k_cmp"], config, cu_seqlens=cu, backend="triton")
    ids_ref = nsa.select_blocks(x64["q"], x64["k_cmp"], config, cu_seqlens=cu, backend="reference")
    assert ids.dtype == torch.long and ids.shape == ids_ref.shape
    match = (ids == ids_ref).all(-1)
    assert match.float().mean() >= min_match, f"only {match.float().mean():.3f} of the selections agree"

    xg = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    o = nsa.nsa_attention(*(xg[n] for n in NAMES), config, cu_seqlens=cu, backend="triton")
    assert o.dtype == x["q"].dtype and o.shape == x["q"].shape[:3] + (x["v_cmp"].shape[-1],)
    do = torch.randn(o.shape, generator=torch.Generator(o.device).manual_seed(seed), device=o.device).to(o.dtype)
    grads = torch.autograd.grad(o, [xg[n] for n in NAMES], do)

    x64g = {k: v.requires_grad_() for k, v in x64.items()}
    o_ref = reference_given_ids(x64g, ids, config, scale, seq_lens)
    grads_ref = torch.autograd.grad(o_ref, [x64g[n] for n in NAMES], do.double())

    # where the selections agree, the triton output also matches the plain reference
    o_plain = nsa.nsa_attention(*(x64[n] for n in NAMES), config, cu_seqlens=cu, backend="reference")
    rows = match.repeat_interleave(o.shape[2] // match.shape[2], dim=2)
    torch.testing.assert_close(o.double()[rows], o_plain[rows], rtol=tol, atol=tol)

    torch.testing.assert_close(o.double(), o_ref, rtol=tol, atol=tol)
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert g.dtype == x[name].dtype and g.shape == x[name].shape, name
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")
    return grads


CASES = [  # B, T, Hkv, G, Dk, Dv, config
    (2, 77, 2, 2, 32, 16, CFG_A),
    (1, 61, 1, 16, 16, 16, CFG_A),
    (2, 13, 2, 1, 16, 16, CFG_A),  # T < l: no compressed tokens
    (1, 93, 2, 4, 16, 32, CFG_B),
    (1, 45, 1, 8, 16, 16, CFG_B),
    (1, 40, 1, 32, 16, 16, CFG_B),
    (1, 300, 1, 2, 16, 16, CFG_C),
    (1, 150, 1, 2, 16, 16, NSAConfig()),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Hkv{}G{}Dk{}Dv{}-{}".format(
    *c[:6], CONFIG_NAMES[c[6]]))
def test_op_matches_reference(case):
    B, T, Hkv, G, Dk, Dv, config = case
    check_op(make_inputs(B, T, Hkv, G, Dk, Dv, config), config)


def test_op_varlen():
    seq_lens = [40, 7, 0, 50]
    check_op(make_inputs(1, sum(seq_lens), 2, 2, 16, 16, CFG_A, seq_lens=seq_lens), CFG_A, seq_lens)


def test_op_backward_is_bitwise_reproducible():
    """No float atomics anywhere: two runs give the same bits, without torch.use_deterministic_algorithms."""
    x = make_inputs(1, 70, 1, 4, 16, 16, CFG_A, seed=5)
    runs = []
    for _ in range(2):
        xg = {k: v.clone().requires_grad_() for k, v in x.items()}
        o = nsa.nsa_attention(*(xg[n] for n in NAMES), CFG_A, backend="triton")
        runs.append(torch.autograd.grad(o, [xg[n] for n in NAMES], torch.ones_like(o)))
    for name, a, b in zip(NAMES, *runs):
        assert torch.equal(a, b), name


def test_op_rejects_what_the_kernels_cannot_do():
    x = make_inputs(1, 20, 1, 1, 16, 16, CFG_A, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        nsa.nsa_attention(*(x[n] for n in NAMES), CFG_A, backend="triton")
    x = make_inputs(1, 20, 1, 1, 512, 16, CFG_A)
    with pytest.raises(ValueError, match="256"):
        nsa.nsa_attention(*(x[n] for n in NAMES), CFG_A, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("G", [16, 4])
def test_gpu_bfloat16_8k(G):
    config, T, Hkv, D = NSAConfig(), 8192, 1, 128
    x = make_inputs(1, T, Hkv, G, D, D, config, dtype=torch.bfloat16, device="cuda", seed=G)
    scale = D ** -0.5
    xg = {k: v.clone().requires_grad_() for k, v in x.items()}
    o = nsa.nsa_attention(*(xg[n] for n in NAMES), config, backend="triton")
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, [xg[n] for n in NAMES], do)
    ids = nsa.select_blocks(x["q"], x["k_cmp"], config, backend="triton")
    ids_ref = nsa.select_blocks(x["q"].float(), x["k_cmp"].float(), config, backend="reference")
    assert (ids == ids_ref).all(-1).float().mean() > 0.9
    x32 = {k: v.float().requires_grad_() for k, v in x.items()}
    o_ref = reference_given_ids(x32, ids, config, scale)
    grads_ref = torch.autograd.grad(o_ref, [x32[n] for n in NAMES], do.float())
    for name, a, b in zip(("o",) + NAMES, (o,) + grads, (o_ref,) + grads_ref):
        err = (a.float() - b).norm() / b.norm().clamp_min(1e-6)
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("G", [16, 4])
def test_gpu_training_step_has_no_host_sync(G):
    """Forward + backward of the op never waits for the device (dense batch: nothing to read back)."""
    config, T, Hkv, D = NSAConfig(), 4096, 2, 64
    x = make_inputs(2, T, Hkv, G, D, D, config, dtype=torch.bfloat16, device="cuda", seed=G)
    xg = [x[n].clone().requires_grad_() for n in NAMES]
    nsa.nsa_attention(*xg, config, backend="triton").sum().backward()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = nsa.nsa_attention(*xg, config, backend="triton")
        torch.autograd.grad(o, xg, torch.ones_like(o))
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("seq_lens", [None, [1500, 700, 1896]], ids=["dense", "packed"])
@pytest.mark.parametrize("G", [16, 4])
def test_gpu_concurrent_branches_are_bitwise_one_stream(G, seq_lens):
    """The second stream (KernelOptions.concurrent_branches) changes only the timing: the output and all eight
    gradients equal those of one stream bit for bit, dense and packed."""
    config, Hkv, D = NSAConfig(), 2, 64
    T = 4096 if seq_lens is None else sum(seq_lens)
    x = make_inputs(1, T, Hkv, G, D, D, config, dtype=torch.bfloat16, seq_lens=seq_lens, device="cuda", seed=G)
    cu = cu_of(seq_lens, "cuda")
    do = torch.randn(1, T, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    runs = []
    for concurrent in (True, False):
        xg = [x[n].clone().requires_grad_() for n in NAMES]
        options = nsa.KernelOptions(concurrent_branches=concurrent)
        o = nsa.nsa_attention(*xg, config, cu_seqlens=cu, backend="triton", kernel_options=options)
        runs.append((o, *torch.autograd.grad(o, xg, do)))
    for name, a, b in zip(("o",) + NAMES, *runs):
        assert torch.equal(a, b), name
