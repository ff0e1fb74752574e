"""Triton block selection (ops/triton/selection.py) against nsa.ops.reference.select_blocks.

Float rounding can swap near-tied blocks, so rows are compared robustly: the structure must be exact
(forced blocks present, ids ascending then -1, as many ids as the reference), every id that differs
from the reference must score within a small tolerance of the reference's n-th best, and almost all
rows must match exactly.
"""
import pytest
import torch
import triton
import triton.language as tl

from nsa import NSAConfig
from nsa.ops import reference
from nsa.ops.reference import cmp_slc_overlap
from nsa.ops.triton.banded import banded_attention_fwd
from nsa.ops.triton.topn import select_blocks_fwd
from nsa.ops.triton.utils import top_keys

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log2(0) in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def group_scores(q, k_cmp, config, scale):
    """Float64 P [B, T, Hkv, Nb] of SPEC.md for one batch of equal-length sequences."""
    B, T, Hq, _ = q.shape
    Tc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    k = k_cmp.double().repeat_interleave(Hq // Hkv, dim=2)
    s = scale * torch.einsum("bthd,bihd->bhti", q.double(), k)
    end = torch.arange(Tc, device=q.device) * config.cmp_stride + config.cmp_block - 1
    vis = end[None, :] <= torch.arange(T, device=q.device)[:, None]
    p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1).nan_to_num(0.0)
    p_slc = p @ cmp_slc_overlap(Tc, config.num_slc_blocks(T), config, q.device)  # [B, Hq, T, Nb]
    return p_slc.unflatten(1, (Hkv, Hq // Hkv)).sum(2).transpose(1, 2)


def run_triton(q, k_cmp, config, scale, lens=None):
    varlen = {}
    if lens is not None:
        cu = lambda ls: torch.tensor([0] + ls, device=q.device).cumsum(0).to(torch.int32)  # noqa: E731
        varlen = dict(cu_seqlens_q=cu(lens), cu_seqlens_k=cu([config.num_cmp_tokens(n) for n in lens]))
    _, lse = banded_attention_fwd(q, k_cmp, k_cmp, scale, key_stride=config.cmp_stride,
                                  key_span=config.cmp_block, **varlen)
    return select_blocks_fwd(q, k_cmp, lse, config, scale, **varlen)


def assert_selection_matches(ids, ref, score, config, tol, min_exact=0.99):
    """ids (Triton), ref (reference) [..., T, Hkv, n]; score: reference P [..., T, Hkv, Nb]."""
    assert ids.dtype == torch.int32 and ids.shape == ref.shape
    ids, ref = ids.long(), ref.long()
    n = config.num_selected
    t = torch.arange(ids.shape[-3], device=ids.device)[:, None, None]
    last = (t // config.slc_block).expand(ids.shape[:-1] + (1,))
    valid = ids >= 0
    # Same number of ids, ascending, -1 only trailing, all candidates, forced blocks present.
    assert torch.equal(valid.sum(-1), (ref >= 0).sum(-1))
    assert torch.equal(valid, torch.arange(n, device=ids.device) < valid.sum(-1, keepdim=True))
    big = torch.where(valid, ids, torch.iinfo(torch.long).max)
    assert (big[..., 1:] > big[..., :-1]).logical_or(~valid[..., 1:]).all()
    assert (ids <= last).all()
    for forced in (torch.zeros_like(last), last, last - 1):
        assert ((ids == forced).any(-1, keepdim=True) | (forced < 0)).all()
    # Ids that differ from the reference must be near-ties of the reference's n-th best score.
    gathered = lambda x: score.gather(-1, x.clamp(min=0))  # noqa: E731
    ref_floor = gathered(ref).masked_fill(ref < 0, float("inf")).min(-1, keepdim=True).values
    extra = valid & ~(ids[..., :, None] == ref[..., None, :]).any(-1)
    assert (gathered(ids) >= ref_floor - tol)[extra].all()
    exact = (ids == ref).all(-1).double().mean().item()
    assert exact >= min_exact, exact


def compare(config, B, T, Hq, Hkv, D, dtype=torch.float32, seed=0, tol=1e-6, min_exact=0.99):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE, dtype)
    k_cmp = torch.randn(B, config.num_cmp_tokens(T), Hkv, D, generator=g).to(DEVICE, dtype)
    scale = D ** -0.5
    ids = run_triton(q, k_cmp, config, scale)
    ref = reference.select_blocks(q, k_cmp, config, scale)
    assert_selection_matches(ids, ref, group_scores(q, k_cmp, config, scale), config, tol, min_exact)


@pytest.mark.parametrize("config, T, Hq, Hkv", [
    (NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=24), 100, 4, 2),
    (NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=24), 97, 4, 4),
    (NSAConfig(cmp_block=64, cmp_stride=8, slc_block=32, num_selected=3, window=24), 131, 4, 1),  # l > l'
    (NSAConfig(cmp_block=32, cmp_stride=32, slc_block=32, num_selected=4, window=24), 150, 2, 1),  # d = l = l'
    (NSAConfig(cmp_block=32, cmp_stride=16, slc_block=128, num_selected=4, window=24), 450, 3, 1),  # G = 3, l' = 128
    (NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, num_selected=16, window=24), 200, 2, 1),  # n > candidates
])
def test_matches_reference(config, T, Hq, Hkv):
    compare(config, 2, T, Hq, Hkv, 16)


def test_shorter_than_a_compressed_block():
    """T < l: no compressed token, every candidate scores 0 and is selected."""
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, slc_block=32, num_selected=3, window=24)
    q = torch.randn(2, 20, 2, 16, device=DEVICE)
    ids = run_triton(q, q[:, :0, :1], cfg, 0.25)
    expected = torch.tensor([0, -1, -1], dtype=torch.int32, device=DEVICE)
    assert torch.equal(ids, expected.expand(2, 20, 1, 3))


def test_blocks_too_long_for_float16_pooling_are_refused():
    """16-bit inputs pool with float16 overlap weights, exact up to 2048: longer blocks raise, float32 runs."""
    cfg = NSAConfig(cmp_block=4096, cmp_stride=2048, slc_block=4096, num_selected=2, window=8)
    q = torch.randn(1, 20, 2, 16, device=DEVICE)
    assert run_triton(q, q[:, :0, :1], cfg, 0.25).shape == (1, 20, 1, 2)
    with pytest.raises(ValueError, match="cmp_block <= 2048 or slc_block <= 2048"):
        run_triton(q.half(), q[:, :0, :1].half(), cfg, 0.25)


def test_packed_sequences():
    cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=3, window=24)
    lens = [61, 10, 75]  # the middle one is shorter than l
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, sum(lens), 4, 16, generator=g).to(DEVICE)
    k_cmp = torch.randn(1, sum(cfg.num_cmp_tokens(n) for n in lens), 2, 16, generator=g).to(DEVICE)
    ids = run_triton(q, k_cmp, cfg, 0.25, lens)
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    ref = reference.select_blocks(q, k_cmp, cfg, 0.25, seq_lens=lens)
    start = start_c = 0
    for n in lens:
        nc = cfg.num_cmp_tokens(n)
        score = group_scores(q[:, start:start + n], k_cmp[:, start_c:start_c + nc], cfg, 0.25)
        assert_selection_matches(ids[:, start:start + n], ref[:, start:start + n], score, cfg, 1e-6)
        start, start_c = start + n, start_c + nc
    assert start == int(cu[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("config", [NSAConfig(),
                                    NSAConfig(cmp_block=64, cmp_stride=8, slc_block=128, num_selected=8),
                                    NSAConfig(cmp_block=16, cmp_stride=16, slc_block=32, num_selected=16)])
@pytest.mark.parametrize("Hq, Hkv, D", [(16, 1, 128), (8, 2, 64), (6, 2, 192)])
def test_gpu_bfloat16(config, Hq, Hkv, D):
    compare(config, 1, 8192, Hq, Hkv, D, torch.bfloat16, tol=2e-2, min_exact=0.97)


@pytest.mark.parametrize("n", [1, 2])
def test_fewer_slots_than_forced_blocks_keeps_the_local_ones(n):
    """With n < 3 the choice is fixed by SPEC's priority (J(t), then J(t) - 1, then 0): no ties to excuse."""
    config = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=n, window=8)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    q = torch.randn(1, 70, 2, 16, generator=g, device=DEVICE)
    k_cmp = torch.randn(1, config.num_cmp_tokens(70), 1, 16, generator=g, device=DEVICE)
    ids = run_triton(q, k_cmp, config, 0.25)
    assert torch.equal(ids.long(), reference.select_blocks(q, k_cmp, config, 0.25))


@triton.jit
def _top_keys_kernel(X, Y, K: tl.constexpr, N_SELECT: tl.constexpr, N_PAD: tl.constexpr):
    rows = tl.arange(0, 4)[:, None]
    keys = tl.load(X + rows * K + tl.arange(0, K)[None, :])
    tl.store(Y + rows * N_PAD + tl.arange(0, N_PAD)[None, :], top_keys(keys, N_SELECT, N_PAD))


@pytest.mark.parametrize("K, n", [(16, 16), (128, 16), (256, 3), (512, 16), (1024, 5)])
def test_top_keys_both_paths(K, n):
    """top_keys (bitonic up to 256 keys a row, max-rounds above) = each row's n largest keys, descending, then -1."""
    n_pad = triton.next_power_of_2(n)
    keys = torch.randperm(10 * K, device=DEVICE)[:4 * K].reshape(4, K) * (1 << 31)  # distinct, past 32 bits
    keys[:, : K // 8] = -1  # non-candidates
    out = torch.empty(4, n_pad, dtype=torch.int64, device=DEVICE)
    _top_keys_kernel[(1,)](keys, out, K, n, n_pad)
    expect = keys.sort(1, descending=True).values[:, :n_pad].clone()
    expect[:, n:] = -1
    assert torch.equal(out, expect)
