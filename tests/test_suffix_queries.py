"""Suffix queries: the op with Tk >= Tq keys, the queries being the last Tq positions of the keys' sequence
(FlashAttention's bottom-right causal alignment), equals the full-sequence op's last Tq rows, outputs and gradients.

Dense (one Tk for every row) and packed (cu_seqlens of the queries, cu_seqlens_k of the keys, uneven lengths, a
sequence with no query at all), the float64 reference and the Triton kernels (float32, under the interpreter on the
CPU). Not bitwise: the query chunks and tiles start at different rows, so sums run in another order.
"""
import pytest
import torch

import nsa
from nsa import NSAConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the Triton cases: kernels on a GPU, else interpreted
NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates")
# n = 4 of up to ~10 blocks: besides the three forced blocks (0, J - 1, J) one is chosen by its score
CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4, window=12)


def full_inputs(key_lens, B=1, Hkv=2, G=2, D=16, dtype=torch.float64, seed=0):
    """Packed ([1, sum(key_lens)]) inputs of whole sequences, or dense [B, key_lens[0]] ones when B > 1."""
    gen = torch.Generator().manual_seed(seed)
    T = key_lens[0] if B > 1 else sum(key_lens)
    Tc = CONFIG.num_cmp_tokens(T) if B > 1 else sum(CONFIG.num_cmp_tokens(n) for n in key_lens)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return dict(q=rand(B, T, Hkv * G, D), k_cmp=rand(B, Tc, Hkv, D), v_cmp=rand(B, Tc, Hkv, D),
                k_slc=rand(B, T, Hkv, D), v_slc=rand(B, T, Hkv, D), k_swa=rand(B, T, Hkv, D),
                v_swa=rand(B, T, Hkv, D), gates=torch.sigmoid(rand(B, T, Hkv * G, 3)))


def cu_of(lens, device="cpu"):
    return torch.tensor([0] + list(lens), device=device).cumsum(0).to(torch.int32)


def suffix_rows(key_lens, query_lens):
    """Indices of the packed rows that are each sequence's last query_lens[i] positions."""
    rows, start = [], 0
    for nk, nq in zip(key_lens, query_lens):
        rows.extend(range(start + nk - nq, start + nk))
        start += nk
    return torch.tensor(rows, dtype=torch.long)


def run(x, backend, **packing):
    """o and the eight gradients (against a fixed random do) of the op on inputs x."""
    xg = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    o = nsa.nsa_attention(*(xg[n] for n in NAMES), CONFIG, backend=backend, **packing)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device, o.dtype)
    return o, do, torch.autograd.grad(o, [xg[n] for n in NAMES], do)


def check_suffix(backend, dtype, key_lens, query_lens, dense_batch=None, tol=1e-10, device="cpu"):
    B = dense_batch or 1
    x = {k: v.to(device) for k, v in full_inputs(key_lens, B=B, dtype=dtype).items()}
    rows = suffix_rows(key_lens, query_lens) if dense_batch is None else torch.arange(key_lens[0] - query_lens[0],
                                                                                      key_lens[0])
    rows = rows.to(device)
    full_packing = {} if dense_batch else dict(cu_seqlens=cu_of(key_lens, device))
    suffix_packing = {} if dense_batch else dict(cu_seqlens=cu_of(query_lens, device),
                                                 cu_seqlens_k=cu_of(key_lens, device))
    xs = dict(x, q=x["q"][:, rows], gates=x["gates"][:, rows])
    o, do, grads = run(xs, backend, **suffix_packing)

    xg = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    o_full = nsa.nsa_attention(*(xg[n] for n in NAMES), CONFIG, backend=backend, **full_packing)
    do_full = torch.zeros_like(o_full)
    do_full[:, rows] = do  # the full op's loss sees only the suffix rows
    grads_full = torch.autograd.grad(o_full, [xg[n] for n in NAMES], do_full)

    torch.testing.assert_close(o, o_full[:, rows], rtol=tol, atol=tol)
    for name, g, g_full in zip(NAMES, grads, grads_full):
        expected = g_full[:, rows] if name in ("q", "gates") else g_full
        torch.testing.assert_close(g, expected, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("query_len", [1, 23, 70])
def test_reference_dense_suffix_equals_full_rows(query_len):
    check_suffix("reference", torch.float64, [70], [query_len], dense_batch=2)


def test_reference_packed_suffix_equals_full_rows():
    # uneven: a whole sequence, a sequence with no query, short suffixes, a sequence shorter than a compressed block
    check_suffix("reference", torch.float64, [53, 40, 75, 9, 33], [53, 0, 17, 4, 1])


def test_triton_dense_suffix_equals_full_rows():
    check_suffix("triton", torch.float32, [70], [29], dense_batch=2, tol=2e-5, device=DEVICE)


def test_triton_packed_suffix_equals_full_rows():
    check_suffix("triton", torch.float32, [53, 40, 75, 9], [53, 0, 21, 4], tol=2e-5, device=DEVICE)


def test_bad_cu_seqlens_k_is_refused_with_the_fix():
    x = full_inputs([40, 30])
    q_rows = suffix_rows([40, 30], [10, 5])
    args = [x[n] for n in NAMES]
    args[0], args[7] = x["q"][:, q_rows], x["gates"][:, q_rows]
    cu_q = cu_of([10, 5])
    with pytest.raises(ValueError, match="cu_seqlens_k .* needs cu_seqlens"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens_k=cu_of([40, 30]), backend="reference")
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens=cu_q, cu_seqlens_k=cu_of([40, 30]).long(), backend="reference")
    with pytest.raises(ValueError, match="cu_seqlens_k must describe as many sequences"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens=cu_q, cu_seqlens_k=cu_of([40, 20, 10]), backend="reference")
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end at the packed length 70"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens=cu_q, cu_seqlens_k=cu_of([40, 31]), backend="reference")
    with pytest.raises(ValueError, match="sequence 1 has 5 queries but 4 keys"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 66, 70], dtype=torch.int32),
                          backend="reference")
    with pytest.raises(ValueError, match="pass cu_seqlens_k"):
        nsa.nsa_attention(*args, CONFIG, cu_seqlens=cu_q, backend="reference")


def test_dense_keys_must_cover_the_queries():
    x = full_inputs([40], B=2)
    args = [x[n] for n in NAMES]
    args[0], args[7] = torch.cat([x["q"], x["q"]], 1), torch.cat([x["gates"], x["gates"]], 1)
    with pytest.raises(ValueError, match=r"the keys must cover the queries \(Tk >= T"):
        nsa.nsa_attention(*args, CONFIG, backend="reference")
