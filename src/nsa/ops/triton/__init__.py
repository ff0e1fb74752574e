"""The Triton backend of the NSA op: the entry points ops/__init__.py dispatches to.

nsa_attention runs, in one torch.autograd.Function:
  1. compressed branch (flash.banded_attention_fwd over k_cmp/v_cmp, band e(i) = i*d + l - 1 <= t)
     -> o_cmp, lse_cmp;
  2. block selection (selection.select_blocks_fwd, from q, k_cmp and lse_cmp) -> block ids;
  3. selected branch (selected.selected_attention_fwd over k_slc/v_slc) -> o_slc, lse_slc;
  4. window branch (flash.banded_attention_fwd over k_swa/v_swa, window w) -> o_swa, lse_swa;
  5. gating, one fused kernel: o = g0 * o_cmp + g1 * o_slc + g2 * o_swa.
It saves what a FlashAttention-style op keeps: the inputs, the three branch outputs, their lses and
the block ids (nothing of size T x T or T x Tc). Backward: one fused kernel gives
dgates[..., c] = sum_d do * o_c and the branch output gradients do_c = g_c * do; then each branch's
backward; dq is the sum of the three branches' dq.

Determinism: the backward uses no float atomics (every gradient tile has one writer that sums in a
fixed order), so gradients are bitwise reproducible run to run, always, whatever
torch.are_deterministic_algorithms_enabled() says. On an H100 this was also the faster design: the
atomic variants (dq added from the banded dk/dv kernels, dk/dv added from the selected branch's
query-major walk) measured slower; the numbers are in BENCHMARKS.md.

Limits (ValueError / TypeError naming them): CUDA tensors unless TRITON_INTERPRET=1; float16,
bfloat16 or float32 (use backend="reference" for float64); head dims up to 256.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import NSAConfig
from ..checks import cmp_seqlens
from .selected import MAX_HEAD_DIM, selected_attention_bwd, selected_attention_fwd
from .utils import interpreting, pow2_at_least

# flash.py (banded_attention_fwd/bwd) and selection.py (select_blocks_fwd) are imported where they
# are used, so that importing one kernel module of this package never requires all the others.

__all__ = ["nsa_attention", "select_blocks", "selected_attention_fwd", "selected_attention_bwd"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_backend_inputs(q: torch.Tensor, head_dims) -> None:
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend needs CUDA tensors, got {q.device} "
                         "(or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        "use backend='reference' for float64")
    if max(head_dims) > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {tuple(head_dims)}")


def _packing(config: NSAConfig, seq_lens, device):
    """(cu_seqlens of the compressed tokens, max raw length) for packed batches; (None, None) for dense ones."""
    if seq_lens is None:
        return None, None
    cu_cmp = [0]
    for n in cmp_seqlens(seq_lens, config):
        cu_cmp.append(cu_cmp[-1] + n)
    return torch.tensor(cu_cmp, dtype=torch.int32, device=device), max(max(seq_lens), 1)


# ----------------------------------------------------------------------------------------------
# Gating kernels: rows r = (b, t, h) of [B*T*Hq, Dv]


def _gate_launch(rows: int, dv: int):
    block_d = pow2_at_least(dv)
    block_r = max(1, 4096 // block_d)
    return (triton.cdiv(rows, block_r),), dict(BLOCK_R=block_r, BLOCK_D=block_d)


@triton.jit
def _gate_fwd_kernel(GATES, OC, OS, OW, O, ROWS, DV, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = g0 * o_cmp + g1 * o_slc + g2 * o_swa, in float32; GATES [ROWS, 3], the rest [ROWS, DV]."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < ROWS
    mask = row_ok[:, None] & (d[None, :] < DV)
    off = r[:, None] * DV + d[None, :]
    g0 = tl.load(GATES + r * 3, mask=row_ok).to(tl.float32)[:, None]
    g1 = tl.load(GATES + r * 3 + 1, mask=row_ok).to(tl.float32)[:, None]
    g2 = tl.load(GATES + r * 3 + 2, mask=row_ok).to(tl.float32)[:, None]
    o = (g0 * tl.load(OC + off, mask=mask).to(tl.float32) + g1 * tl.load(OS + off, mask=mask).to(tl.float32)
         + g2 * tl.load(OW + off, mask=mask).to(tl.float32))
    tl.store(O + off, o.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_branch(do, r, off, row_ok, mask, c: tl.constexpr, GATES, O_C, DGATES, DO_C):
    """Branch c of the gate backward: dgates[r, c] = sum_d do * o_c, do_c = g_c * do."""
    o_c = tl.load(O_C + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DGATES + r * 3 + c, tl.sum(do * o_c, axis=1).to(DGATES.dtype.element_ty), mask=row_ok)
    g_c = tl.load(GATES + r * 3 + c, mask=row_ok).to(tl.float32)
    tl.store(DO_C + off, (g_c[:, None] * do).to(DO_C.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(DO, GATES, OC, OS, OW, DGATES, DOC, DOS, DOW, ROWS, DV,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gate backward for the three branches (cmp, slc, swa); do is read once, in float32."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < ROWS
    mask = row_ok[:, None] & (d[None, :] < DV)
    off = r[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    _gate_bwd_branch(do, r, off, row_ok, mask, 0, GATES, OC, DGATES, DOC)
    _gate_bwd_branch(do, r, off, row_ok, mask, 1, GATES, OS, DGATES, DOS)
    _gate_bwd_branch(do, r, off, row_ok, mask, 2, GATES, OW, DGATES, DOW)


def gate_combine(gates, o_cmp, o_slc, o_swa):
    """gates [B, T, Hq, 3], o_* [B, T, Hq, Dv] (contiguous) -> o [B, T, Hq, Dv]."""
    o = torch.empty_like(o_cmp)
    rows, dv = o.numel() // o.shape[-1], o.shape[-1]
    grid, meta = _gate_launch(rows, dv)
    _gate_fwd_kernel[grid](gates, o_cmp, o_slc, o_swa, o, rows, dv, **meta)
    return o


def gate_backward(do, gates, o_cmp, o_slc, o_swa):
    """-> dgates [B, T, Hq, 3] (gates' dtype), do_cmp, do_slc, do_swa [B, T, Hq, Dv] (do's dtype)."""
    dgates = torch.empty_like(gates)
    do_branch = [torch.empty_like(do) for _ in range(3)]
    rows, dv = do.numel() // do.shape[-1], do.shape[-1]
    grid, meta = _gate_launch(rows, dv)
    _gate_bwd_kernel[grid](do, gates, o_cmp, o_slc, o_swa, dgates, *do_branch, rows, dv, **meta)
    return dgates, *do_branch


# ----------------------------------------------------------------------------------------------
# The op


class _NSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, cu, cu_cmp, max_len):
        from .flash import banded_attention_fwd, branch_band
        from .selection import select_blocks_fwd
        q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates = (
            x.contiguous() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates))
        cmp_band = dict(branch_band("cmp", config), cu_seqlens_q=cu, cu_seqlens_k=cu_cmp, max_seqlen_q=max_len)
        swa_band = dict(branch_band("swa", config), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len)
        o_cmp, lse_cmp = banded_attention_fwd(q, k_cmp, v_cmp, scale, **cmp_band)
        block_ids = select_blocks_fwd(q, k_cmp, lse_cmp, config, scale, cu_seqlens_q=cu, cu_seqlens_k=cu_cmp,
                                      max_seqlen_q=max_len)
        o_slc, lse_slc = selected_attention_fwd(q, k_slc, v_slc, block_ids, scale, config.slc_block,
                                                cu_seqlens=cu, max_seqlen=max_len)
        o_swa, lse_swa = banded_attention_fwd(q, k_swa, v_swa, scale, **swa_band)
        o = gate_combine(gates, o_cmp, o_slc, o_swa)
        ctx.save_for_backward(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, o_cmp, o_slc, o_swa,
                              lse_cmp, lse_slc, lse_swa, block_ids)
        ctx.config, ctx.scale, ctx.max_len = config, scale, max_len
        ctx.cu, ctx.cmp_band, ctx.swa_band = cu, cmp_band, swa_band
        return o

    @staticmethod
    def backward(ctx, do):
        from .flash import banded_attention_bwd
        (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, o_cmp, o_slc, o_swa,
         lse_cmp, lse_slc, lse_swa, block_ids) = ctx.saved_tensors
        scale = ctx.scale
        dgates, do_cmp, do_slc, do_swa = gate_backward(do.contiguous(), gates, o_cmp, o_slc, o_swa)
        dq_cmp, dk_cmp, dv_cmp = banded_attention_bwd(do_cmp, q, k_cmp, v_cmp, o_cmp, lse_cmp, scale, **ctx.cmp_band)
        dq_slc, dk_slc, dv_slc = selected_attention_bwd(do_slc, q, k_slc, v_slc, o_slc, lse_slc, block_ids, scale,
                                                        ctx.config.slc_block, cu_seqlens=ctx.cu, max_seqlen=ctx.max_len)
        dq_swa, dk_swa, dv_swa = banded_attention_bwd(do_swa, q, k_swa, v_swa, o_swa, lse_swa, scale, **ctx.swa_band)
        dq = dq_cmp.add_(dq_slc).add_(dq_swa)
        return (dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_swa, dv_swa, dgates) + (None,) * 5


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, *, cu_seqlens=None,
                  seq_lens=None):
    """NSA (SPEC.md) with the Triton kernels; inputs already validated by ops/checks.py.

    q [B, T, Hq, Dk]; k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv]; k_slc, v_slc, k_swa, v_swa
    [B, T, Hkv, Dk or Dv]; gates [B, T, Hq, 3]; cu_seqlens int32 [N + 1] with seq_lens its python
    lengths when packed. Returns o [B, T, Hq, Dv] in q's dtype, differentiable w.r.t. all eight inputs.
    """
    _check_backend_inputs(q, (q.shape[-1], v_cmp.shape[-1]))
    cu_cmp, max_len = _packing(config, seq_lens, q.device)
    return _NSAFunction.apply(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale,
                              cu_seqlens, cu_cmp, max_len)


@torch.no_grad()
def select_blocks(q, k_cmp, config, scale, *, cu_seqlens=None, seq_lens=None):
    """q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] -> long [B, T, Hkv, n], ids ascending then -1.

    The selection needs lse_cmp only; the compressed forward runs with v = k_cmp to get it."""
    from .flash import banded_attention_fwd
    from .selection import select_blocks_fwd
    _check_backend_inputs(q, (q.shape[-1],))
    cu_cmp, max_len = _packing(config, seq_lens, q.device)
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    _, lse_cmp = banded_attention_fwd(q, k_cmp, k_cmp, scale, key_stride=config.cmp_stride,
                                      key_span=config.cmp_block, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_cmp,
                                      max_seqlen_q=max_len)
    ids = select_blocks_fwd(q, k_cmp, lse_cmp, config, scale, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_cmp,
                            max_seqlen_q=max_len)
    return ids.long()
