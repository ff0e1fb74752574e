"""The training op of NSA in Triton: what the custom ops of ops/library.py (nsa::attention, its backward,
nsa::select_blocks) run for backend="triton".

nsa_attention_fwd runs:
  1. compressed branch (banded.banded_attention_fwd over k_cmp/v_cmp, band e(i) = i*d + l - 1 <= t)
     -> o_cmp, lse_cmp;
  2. block selection (topn.select_blocks_fwd, from q, k_cmp and lse_cmp) -> block ids;
  3. selected branch (selected_attention.selected_attention_fwd over k_slc/v_slc) -> o_slc, lse_slc;
  4. window branch (banded.banded_attention_fwd over k_swa/v_swa, window w) -> o_swa, lse_swa;
  5. gating, one fused kernel: o = g0 * o_cmp + g1 * o_slc + g2 * o_swa.
nsa_attention_fwd returns, and the op's autograd saves, what a FlashAttention-style op keeps: the inputs, the
three branch outputs, their lses and the block ids (nothing of size T x T or T x Tc). nsa_attention_bwd: one
fused kernel gives dgates[..., c] = sum_d do * o_c and each branch's delta = rowsum(do_c * o_c) for its output
gradient do_c = g_c * do; then each branch's backward on its do_c (made just before), the later ones adding their
dq into the first's.

Two streams in the backward (KernelOptions.concurrent_branches, on by default, CUDA only). The selected branch's
kernels are bound by L2 bandwidth (each query's group loads its 16 blocks of K and V), the banded ones by the tensor
cores, so the selected branch's backward runs on a second stream: its dk/dv beside the compressed branch's backward,
then its dq, once the compressed dq it adds to is written, beside the window branch's dk/dv; the window branch's dq
waits for it. Events order the streams on the device (no host sync); the sums are those of one stream, so the
results are bitwise equal. On an H100 (BENCHMARKS.md, 2026-12-07) forward + backward took 3% less time at shape P 8k
and 6% less at S 8k, level at 64k, peak memory unchanged. The same for the window branch's forward beside the
selected forward gained nothing, so the forward stays on one stream. Inside CUDA-graph capture the op stays on the
capturing stream.

Determinism: the backward uses no float atomics (every gradient tile has one writer that sums in a
fixed order), so gradients are bitwise reproducible run to run, always, whatever
torch.are_deterministic_algorithms_enabled() says. On an H100 this was also the faster design: the
atomic variants (dq added from the banded dk/dv kernels, dk/dv added from the selected branch's
query-major walk) measured slower; the numbers are in BENCHMARKS.md.

Limits (ValueError / TypeError naming them): CUDA tensors unless TRITON_INTERPRET=1; float16,
bfloat16 or float32 (use backend="reference" for float64); head dims up to 256.
"""
from __future__ import annotations

import contextlib

import torch

from ...config import NSAConfig
from ..types import KernelOptions
from .banded import banded_attention_bwd, banded_attention_fwd, branch_band
from .gate import gate_backward, gate_combine, gated_grad
from .selected_attention import selected_attention_bwd, selected_attention_fwd
from .topn import select_blocks_fwd
from .utils import check_backend_inputs


def _bands(config: NSAConfig, T: int, Tk: int, cu_seqlens, seq_lens, cu_seqlens_k, seq_lens_k,
           options: KernelOptions):
    """The keyword arguments of the kernels: (cmp_band, swa_band, slc, select, max_query_end).

    Suffix queries: each sequence's queries are the last rows of its keys (Tk raw keys for T queries when dense;
    seq_lens_k against seq_lens when packed), so query row t sits at position t + (key length - query length).
    max_query_end: the longest key sequence (its last query's position + 1). The compressed tokens' cu_seqlens and
    the query offsets are computed on the device from cu_seqlens(_k) (no host-to-device copy, which would wait for
    the device); the grid sizes come from the host lengths.
    """
    if seq_lens is None:
        offsets, cu_keys, cu_cmp, max_q, max_end = dict(q_offset=Tk - T), None, None, None, Tk
    else:
        key_lens = seq_lens if seq_lens_k is None else seq_lens_k
        cu_keys = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
        n_keys = cu_keys.diff()
        l, d = config.cmp_block, config.cmp_stride
        n_cmp = torch.where(n_keys >= l, torch.div(n_keys - l, d, rounding_mode="floor") + 1, 0)
        cu_cmp = torch.nn.functional.pad(n_cmp.cumsum(0), (1, 0)).to(torch.int32)
        max_q, max_end = max(max(seq_lens), 1), max(max(key_lens), 1)
        offsets = dict(q_offsets=(n_keys - cu_seqlens.diff()).to(torch.int32))
    packing = dict(cu_seqlens_q=cu_seqlens, max_seqlen_q=max_q, **offsets)
    cmp_band = dict(branch_band("cmp", config), cu_seqlens_k=cu_cmp, options=options, **packing)
    swa_band = dict(branch_band("swa", config), cu_seqlens_k=cu_keys, options=options, **packing)
    slc = dict(cu_seqlens=cu_seqlens, max_seqlen=max_q, cu_seqlens_k=cu_keys, max_seqlen_k=max_end, options=options)
    select = dict(cu_seqlens_k=cu_cmp, max_query_end=max_end, **packing)
    return cmp_band, swa_band, slc, select, max_end


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}  # the second stream of each device, made on first use


def _side_stream(device: torch.device, options: KernelOptions) -> torch.cuda.Stream | None:
    """The stream the op runs a branch on beside the current one (one per device, high priority, so that its blocks
    are scheduled as soon as SMs free up), or None: everything on the current stream (concurrent_branches off, not
    CUDA, or the current stream is capturing a CUDA graph)."""
    if not options.concurrent_branches or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    if device.index not in _SIDE_STREAMS:
        _SIDE_STREAMS[device.index] = torch.cuda.Stream(device, priority=-1)
    return _SIDE_STREAMS[device.index]


def _event(stream: torch.cuda.Stream | None, side: torch.cuda.Stream | None) -> torch.cuda.Event | None:
    """An event recorded on `stream` (None: the current one) after what it was given so far; None without side."""
    if side is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


@contextlib.contextmanager
def _on(side: torch.cuda.Stream | None, after: torch.cuda.Event | None):
    """Launches inside the block go to `side`, which first waits for `after`; without side, to the current stream."""
    if side is None:
        yield
        return
    side.wait_event(after)
    with torch.cuda.stream(side):
        yield


def _join(side: torch.cuda.Stream | None, *made_on_side: torch.Tensor) -> None:
    """The current stream waits for all that side was given; the tensors allocated on side are marked as used by the
    current stream (their memory is not handed back to side while this stream may still read it)."""
    if side is None:
        return
    current = torch.cuda.current_stream()
    current.wait_stream(side)
    for x in made_on_side:
        x.record_stream(current)


def nsa_attention_fwd(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, *, cu_seqlens=None,
                      seq_lens=None, cu_seqlens_k=None, seq_lens_k=None,
                      kernel_options: KernelOptions = KernelOptions()):
    """The forward of NSA (SPEC.md) with the Triton kernels; inputs already validated by ops/checks.py.

    q [B, T, Hq, Dk]; k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv]; k_slc, v_slc, k_swa, v_swa
    [B, Tk, Hkv, Dk or Dv] (Tk >= T: the queries are the last T positions); gates [B, T, Hq, 3]; cu_seqlens int32
    [N + 1] with seq_lens its python lengths when packed, and cu_seqlens_k / seq_lens_k those of the keys when they
    are longer than the queries. Returns (o [B, T, Hq, Dv] in q's dtype, then what the backward needs: o_cmp, o_slc,
    o_swa [B, T, Hq, Dv], lse_cmp, lse_slc, lse_swa float32 [B, Hq, T], block_ids int32 [B, T, Hkv, n]).
    The autograd of the op lives in ops/library.py (the custom op nsa::attention), which calls nsa_attention_bwd.
    """
    check_backend_inputs(q, (q.shape[-1], v_cmp.shape[-1]))
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = (
        x.contiguous() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates))
    cmp_band, swa_band, slc, select, _ = _bands(config, q.shape[1], k_slc.shape[1], cu_seqlens, seq_lens,
                                                cu_seqlens_k, seq_lens_k, kernel_options)
    o_cmp, lse_cmp = banded_attention_fwd(q, k_cmp, v_cmp, scale, **cmp_band)
    block_ids = select_blocks_fwd(q, k_cmp, lse_cmp, config, scale, **select)
    o_slc, lse_slc = selected_attention_fwd(q, k_slc, v_slc, block_ids, scale, config.slc_block, **slc)
    o_swa, lse_swa = banded_attention_fwd(q, k_swa, v_swa, scale, **swa_band)
    o = gate_combine(gates, o_cmp, o_slc, o_swa)
    return o, o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, block_ids


def nsa_attention_bwd(do, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, o_cmp, o_slc, o_swa,
                      lse_cmp, lse_slc, lse_swa, block_ids, config, scale, *, cu_seqlens=None, seq_lens=None,
                      cu_seqlens_k=None, seq_lens_k=None, kernel_options: KernelOptions = KernelOptions()):
    """The gradients of the eight inputs (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_swa, dv_swa, dgates) from do and
    what nsa_attention_fwd returned."""
    q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = (
        x.contiguous() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates))
    cmp_band, swa_band, slc, _, max_end = _bands(config, q.shape[1], k_slc.shape[1], cu_seqlens, seq_lens,
                                                 cu_seqlens_k, seq_lens_k, kernel_options)
    # Each branch's output gradient do_c = gates[..., c] * do is made just before its backward and dropped after it
    # (one [B, T, Hq, Dv] tensor at a time on one stream; with a side stream the selected branch's beside one other);
    # its delta comes from the gate kernel; the later branches add their dq into the first's:
    # dq = (dq_cmp + dq_slc) + dq_swa, in float32 inside each dq kernel, rounded once per branch.
    # With a side stream (module docstring) the selected branch runs there: its dk/dv from the start, its dq after the
    # compressed branch's (cmp_dq), the window branch's dq after it (slc_dq). Host order = the order of the events.
    do = do.contiguous()
    dgates, delta = gate_backward(do, gates, o_cmp, o_slc, o_swa)
    side = _side_stream(q.device, kernel_options)
    deltas_ready = _event(None, side)
    dq, dk_cmp, dv_cmp = banded_attention_bwd(gated_grad(do, gates, 0), q, k_cmp, v_cmp, o_cmp, lse_cmp, scale,
                                              **cmp_band, max_query_end=max_end, delta=delta[0])
    cmp_dq = _event(None, side)
    with _on(side, deltas_ready):
        _, dk_slc, dv_slc = selected_attention_bwd(gated_grad(do, gates, 1), q, k_slc, v_slc, o_slc, lse_slc,
                                                   block_ids, scale, config.slc_block, **slc, delta=delta[1],
                                                   add_dq_to=dq, dq_after=cmp_dq)
    slc_dq = _event(side, side)
    _, dk_swa, dv_swa = banded_attention_bwd(gated_grad(do, gates, 2), q, k_swa, v_swa, o_swa, lse_swa, scale,
                                             **swa_band, max_query_end=max_end, delta=delta[2], add_dq_to=dq,
                                             dq_after=slc_dq)
    _join(side, dk_slc, dv_slc)
    return dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_swa, dv_swa, dgates


@torch.no_grad()
def select_blocks(q, k_cmp, config, scale, *, cu_seqlens=None, seq_lens=None,
                  kernel_options: KernelOptions = KernelOptions()):
    """q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] -> long [B, T, Hkv, n], ids ascending then -1.

    The selection needs lse_cmp only; the compressed forward runs with v = k_cmp to get it."""
    check_backend_inputs(q, (q.shape[-1],))
    cmp_band, _, _, select, _ = _bands(config, q.shape[1], q.shape[1], cu_seqlens, seq_lens, None, None,
                                       kernel_options)
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    _, lse_cmp = banded_attention_fwd(q, k_cmp, k_cmp, scale, **cmp_band)
    ids = select_blocks_fwd(q, k_cmp, lse_cmp, config, scale, **select)
    return ids.long()
