"""Banded flash attention (ops/triton/banded.py) against a dense float64 masked attention.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), so the CPU cases are tiny;
@pytest.mark.gpu cases use bfloat16 and long sequences.
"""
import pytest
import torch

from nsa import NSAConfig
from nsa.ops.triton.banded import banded_attention_bwd, banded_attention_fwd, branch_band

# log2(0) = -inf for rows that see nothing is intended; the interpreter's NumPy warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")

CPU_CFG = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=24)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def num_keys(branch, config, T):
    return config.num_cmp_tokens(T) if branch == "cmp" else T


def dense_banded(q, k, v, scale, key_stride, key_span, window):
    """Float64 masked attention of one batch of equal-length sequences -> (o [B, T, Hq, Dv], lse [B, Hq, T])."""
    G = q.shape[2] // k.shape[2]
    k, v = (x.double().repeat_interleave(G, dim=2) for x in (k, v))
    t = torch.arange(q.shape[1], device=q.device)[:, None]
    end = torch.arange(k.shape[1], device=q.device)[None, :] * key_stride + key_span - 1
    vis = (end <= t) & ((end > t - window) if window else True)
    s = (scale * torch.einsum("bthd,buhd->bhtu", q.double(), k)).masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with nothing visible: p = 0
    return torch.einsum("bhtu,buhd->bthd", p, v), lse


def dense_banded_packed(q, k, v, scale, lens, key_lens, **band_kw):
    """dense_banded per packed sequence of [1, total, H, D] inputs."""
    outs, lses = [], []
    s = sk = 0
    for n, nk in zip(lens, key_lens):
        o, lse = dense_banded(q[:, s:s + n], k[:, sk:sk + nk], v[:, sk:sk + nk], scale, **band_kw)
        outs.append(o)
        lses.append(lse)
        s, sk = s + n, sk + nk
    return torch.cat(outs, 1), torch.cat(lses, 2)


def rel_err(x, ref):
    if ref.numel() == 0:
        return 0.0
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-2)).item()  # w = 1 gives dq = 0


def make_inputs(B, T, Tk, Hq, Hkv, Dk, Dv, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k = (torch.randn(B, n, h, Dk, generator=g) for n, h in ((T, Hq), (Tk, Hkv)))
    v = torch.randn(B, Tk, Hkv, Dv, generator=g)
    do = torch.randn(B, T, Hq, Dv, generator=g)
    return [x.to(DEVICE, dtype) for x in (q, k, v, do)]


def check_against_dense(q, k, v, do, scale, band_kw, tol, *, packed=None, head_splits=None):
    """Runs fwd + bwd and compares o, lse, dq, dk, dv with the float64 dense attention and its autograd."""
    varlen = {}
    if packed is not None:
        lens, key_lens = packed
        cu = lambda ls: torch.tensor([0] + ls, device=q.device).cumsum(0).to(torch.int32)  # noqa: E731
        varlen = dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu(key_lens))
    o, lse = banded_attention_fwd(q, k, v, scale, **band_kw, **varlen)
    dq, dk, dv = banded_attention_bwd(do, q, k, v, o, lse, scale, **band_kw, **varlen, head_splits=head_splits)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    if packed is None:
        ref_o, ref_lse = dense_banded(q64, k64, v64, scale, **band_kw)
    else:
        ref_o, ref_lse = dense_banded_packed(q64, k64, v64, scale, lens, key_lens, **band_kw)
    ref_o.backward(do.double())
    for x in (o, dq, dk, dv, lse.nan_to_num(neginf=0.0)):
        assert not x.isnan().any()
    assert o.dtype == q.dtype and (dq.dtype, dk.dtype, dv.dtype) == (q.dtype, k.dtype, v.dtype)
    assert torch.equal(lse.isinf(), ref_lse.isinf())  # exactly the rows with nothing visible
    finite = ref_lse.isfinite()
    if finite.any():
        assert (lse[finite].double() - ref_lse[finite]).abs().max() < tol * 10
    for name, x, ref in (("o", o, ref_o), ("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert rel_err(x, ref) < tol, name
    return o, lse, dq, dk, dv


@pytest.mark.parametrize("branch", ["cmp", "swa"])
@pytest.mark.parametrize("G", [1, 2, 4])
def test_matches_dense(branch, G):
    T, Hq = 77, 4
    q, k, v, do = make_inputs(2, T, num_keys(branch, CPU_CFG, T), Hq, Hq // G, 32, 16, torch.float32, seed=G)
    check_against_dense(q, k, v, do, 0.2, branch_band(branch, CPU_CFG), 1e-4)


@pytest.mark.parametrize("branch", ["cmp", "swa"])
def test_packed_sequences(branch):
    lens = [37, 9, 30]  # the middle one is shorter than l = 16: no compressed token
    key_lens = [num_keys(branch, CPU_CFG, n) for n in lens]
    q, k, v, do = make_inputs(1, sum(lens), sum(key_lens), 2, 1, 16, 32, torch.float32, seed=3)
    check_against_dense(q, k, v, do, 0.25, branch_band(branch, CPU_CFG), 1e-4, packed=(lens, key_lens))


@pytest.mark.parametrize("branch", ["cmp", "swa"])
@pytest.mark.parametrize("packed", [False, True])
def test_given_delta_and_dq_accumulation(branch, packed):
    """delta= (NSA's gate kernel makes it) and add_dq_to= (the branches' dq summed in the kernels) change nothing but
    where delta comes from and where dq goes: dk, dv bitwise, dq added to the given tensor in float32."""
    lens = [37, 9, 30] if packed else [45]
    key_lens = [num_keys(branch, CPU_CFG, n) for n in lens]
    q, k, v, do = make_inputs(1 if packed else 2, sum(lens), sum(key_lens), 4, 2, 16, 32, torch.float32, seed=5)
    varlen = {}
    if packed:
        cu = lambda ls: torch.tensor([0] + ls, device=q.device).cumsum(0).to(torch.int32)  # noqa: E731
        varlen = dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu(key_lens))
    band = dict(branch_band(branch, CPU_CFG), **varlen)
    o, lse = banded_attention_fwd(q, k, v, 0.25, **band)
    dq, dk, dv = banded_attention_bwd(do, q, k, v, o, lse, 0.25, **band)
    delta = (do * o).sum(-1).transpose(1, 2)  # a strided view: the kernels take it contiguous
    base = torch.randn_like(q)
    into = base.clone()
    gq, gk, gv = banded_attention_bwd(do, q, k, v, o, lse, 0.25, **band, delta=delta, add_dq_to=into)
    assert gq is into
    torch.testing.assert_close(gq, base + dq, rtol=1e-6, atol=1e-6)  # delta summed in another order
    torch.testing.assert_close(gk, dk, rtol=1e-5, atol=1e-5)
    assert torch.equal(gv, dv)  # dv does not depend on delta


def test_shorter_than_a_compressed_block():
    """T < l: no compressed token, every row sees nothing -> o = 0, lse = -inf, zero gradients, no NaN."""
    q, k, v, do = make_inputs(2, 11, 0, 2, 1, 16, 16, torch.float32)
    o, lse, dq, dk, dv = check_against_dense(q, k, v, do, 0.25, branch_band("cmp", CPU_CFG), 1e-4)
    assert (o == 0).all() and (lse == float("-inf")).all() and (dq == 0).all()
    assert dk.shape == (2, 0, 1, 16) and dv.shape == (2, 0, 1, 16)


@pytest.mark.parametrize("window", [1, 5, 200])
def test_window_extremes(window):
    """w = 1 (each query sees itself), a window off a block boundary, and w > T (plain causal attention)."""
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=window)
    q, k, v, do = make_inputs(1, 41, 41, 2, 2, 16, 16, torch.float32, seed=window)
    check_against_dense(q, k, v, do, 0.3, branch_band("swa", cfg), 1e-4)


def test_head_splits_are_bitwise_reproducible():
    """dk/dv summed over split query heads, and dq from its own kernel: same bits on every run."""
    q, k, v, do = make_inputs(1, 45, num_keys("cmp", CPU_CFG, 45), 4, 1, 16, 16, torch.float32, seed=7)
    runs = [check_against_dense(q, k, v, do, 0.3, branch_band("cmp", CPU_CFG), 1e-4, head_splits=2)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_float16():
    q, k, v, do = make_inputs(1, 50, 50, 2, 1, 32, 32, torch.float16, seed=5)
    check_against_dense(q, k, v, do, 32 ** -0.5, branch_band("swa", CPU_CFG), 2e-2)


def test_rejects_bad_arguments():
    q, k, v, _ = make_inputs(1, 8, 8, 3, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        banded_attention_fwd(q, k, v, 1.0, key_stride=1, key_span=1, window=4)
    with pytest.raises(TypeError, match="float16"):
        banded_attention_fwd(q.double(), k.double(), v.double(), 1.0, key_stride=1, key_span=1, window=4)


def test_head_dims_below_16_take_16_wide_tiles():
    """tl.dot takes no tile dimension below 16 on the GPU (a compile error there, which the interpreter does not
    raise: head dim 8 failed only on the GPU), so the head-dim tiles are padded to 16 at least."""
    from nsa.ops.triton.banded import launch_params
    cfg = launch_params(8, 4)
    assert (cfg["BLOCK_DK"], cfg["BLOCK_DV"]) == (16, 16)
    assert launch_params(24, 96)["BLOCK_DK"] == 32 and launch_params(24, 96)["BLOCK_DV"] == 128


@pytest.mark.gpu
@pytest.mark.parametrize("branch", ["cmp", "swa"])
@pytest.mark.parametrize("dims", [(8, 8), (64, 64), (128, 128), (256, 256), (192, 128)])
def test_gpu_bfloat16(branch, dims):
    cfg = NSAConfig()
    T = 8192
    Dk, Dv = dims
    q, k, v, do = make_inputs(1, T, num_keys(branch, cfg, T), 4, 2, Dk, Dv, torch.bfloat16)
    check_against_dense(q, k, v, do, Dk ** -0.5, branch_band(branch, cfg), 3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("branch", ["cmp", "swa"])
def test_gpu_packed_is_bitwise_reproducible(branch):
    cfg = NSAConfig()
    lens = [3000, 20, 1500, 4000]
    key_lens = [num_keys(branch, cfg, n) for n in lens]
    q, k, v, do = make_inputs(1, sum(lens), sum(key_lens), 4, 1, 128, 128, torch.bfloat16)
    runs = [check_against_dense(q, k, v, do, 128 ** -0.5, branch_band(branch, cfg), 3e-2, packed=(lens, key_lens))
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
