"""The gate mix of NSA's three branches in Triton (SPEC.md, "Output"), forward and backward.

Rows r = (b, t, h) of [B*T*Hq, Dv]:
    o = g0 * o_cmp + g1 * o_slc + g2 * o_swa;
    backward: dgates[r, c] = sum_d do * o_c and the branch output gradients do_c = g_c * do.
All in float32 inside, one pass each way.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import pow2_at_least



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
