"""The gate mix of NSA's three branches in Triton (SPEC.md, "Output"), forward and backward.

Rows r = (b, t, h) of [B*T*Hq, Dv]:
    o = g0 * o_cmp + g1 * o_slc + g2 * o_swa;
    backward: dgates[r, c] = sum_d do * o_c and each branch's delta_c[r] = sum_d do_c * o_c in one pass; the branch
    output gradients do_c = g_c * do one at a time (gated_grad).
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
def _row_tile(ROWS, DV, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_R rows of a [ROWS, DV] tensor: (rows r int64, row_ok, tile mask, element offsets)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    row_ok = r < ROWS
    return r, row_ok, row_ok[:, None] & (d[None, :] < DV), r[:, None] * DV + d[None, :]


@triton.jit
def _gated(do, GATES, r, row_ok, c: tl.constexpr, LIKE):
    """Branch c's output gradient g_c * do of rows r (do float32 [BLOCK_R, BLOCK_D]), rounded to the element type of
    the tensor LIKE points to (do's)."""
    g_c = tl.load(GATES + r * 3 + c, mask=row_ok).to(tl.float32)
    return (g_c[:, None] * do).to(LIKE.dtype.element_ty)


@triton.jit
def _gate_fwd_kernel(GATES, OC, OS, OW, O, ROWS, DV, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """o = g0 * o_cmp + g1 * o_slc + g2 * o_swa, in float32; GATES [ROWS, 3], the rest [ROWS, DV]."""
    r, row_ok, mask, off = _row_tile(ROWS, DV, BLOCK_R, BLOCK_D)
    g0 = tl.load(GATES + r * 3, mask=row_ok).to(tl.float32)[:, None]
    g1 = tl.load(GATES + r * 3 + 1, mask=row_ok).to(tl.float32)[:, None]
    g2 = tl.load(GATES + r * 3 + 2, mask=row_ok).to(tl.float32)[:, None]
    o = (g0 * tl.load(OC + off, mask=mask).to(tl.float32) + g1 * tl.load(OS + off, mask=mask).to(tl.float32)
         + g2 * tl.load(OW + off, mask=mask).to(tl.float32))
    tl.store(O + off, o.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_branch(do, r, off, row_ok, mask, delta_off, c: tl.constexpr, DO, GATES, O_C, DGATES, DELTA_C):
    """Branch c of the gate backward: dgates[r, c] = sum_d do * o_c; delta_c[r] = sum_d do_c * o_c with
    do_c = g_c * do rounded to do's dtype, the output gradient the branch's backward is given (gated_grad)."""
    o_c = tl.load(O_C + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DGATES + r * 3 + c, tl.sum(do * o_c, axis=1).to(DGATES.dtype.element_ty), mask=row_ok)
    do_c = _gated(do, GATES, r, row_ok, c, DO).to(tl.float32)  # what gated_grad stores
    tl.store(DELTA_C + delta_off, tl.sum(do_c * o_c, axis=1), mask=row_ok)


@triton.jit
def _gate_bwd_kernel(DO, GATES, OC, OS, OW, DGATES, DELTA_C, DELTA_S, DELTA_W, ROWS, DV, T, HQ,
                     BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gate backward for the three branches (cmp, slc, swa); do is read once, in float32.
    Row r = (b * T + t) * HQ + h; DELTA_C, DELTA_S, DELTA_W [B, HQ, T] float32 (each branch's rowsum, as its lse)."""
    r, row_ok, mask, off = _row_tile(ROWS, DV, BLOCK_R, BLOCK_D)
    h = r % HQ
    bt = r // HQ
    delta_off = (bt // T * HQ + h) * T + bt % T
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    _gate_bwd_branch(do, r, off, row_ok, mask, delta_off, 0, DO, GATES, OC, DGATES, DELTA_C)
    _gate_bwd_branch(do, r, off, row_ok, mask, delta_off, 1, DO, GATES, OS, DGATES, DELTA_S)
    _gate_bwd_branch(do, r, off, row_ok, mask, delta_off, 2, DO, GATES, OW, DGATES, DELTA_W)


@triton.jit
def _gated_grad_kernel(DO, GATES, DO_C, ROWS, DV, c: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """do_c = g_c * do, in float32, rounded to do's dtype; rows as the other kernels here."""
    r, row_ok, mask, off = _row_tile(ROWS, DV, BLOCK_R, BLOCK_D)
    do = tl.load(DO + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(DO_C + off, _gated(do, GATES, r, row_ok, c, DO_C), mask=mask)


def gate_combine(gates, o_cmp, o_slc, o_swa):
    """gates [B, T, Hq, 3], o_* [B, T, Hq, Dv] (contiguous) -> o [B, T, Hq, Dv]."""
    o = torch.empty_like(o_cmp)
    rows, dv = o.numel() // o.shape[-1], o.shape[-1]
    grid, meta = _gate_launch(rows, dv)
    _gate_fwd_kernel[grid](gates, o_cmp, o_slc, o_swa, o, rows, dv, **meta)
    return o


def gate_backward(do, gates, o_cmp, o_slc, o_swa):
    """do, o_* [B, T, Hq, Dv], gates [B, T, Hq, 3] (contiguous) -> dgates [B, T, Hq, 3] (gates' dtype) and
    delta float32 [3, B, Hq, T]: delta[c] = rowsum(do_c * o_c), the FlashAttention delta of branch c for its output
    gradient do_c = gated_grad(do, gates, c)."""
    B, T, Hq, dv = do.shape
    dgates = torch.empty_like(gates)
    delta = torch.empty(3, B, Hq, T, device=do.device, dtype=torch.float32)
    rows = B * T * Hq
    grid, meta = _gate_launch(rows, dv)
    _gate_bwd_kernel[grid](do, gates, o_cmp, o_slc, o_swa, dgates, *delta, rows, dv, T, Hq, **meta)
    return dgates, delta


def gated_grad(do, gates, c: int):
    """do [B, T, Hq, Dv], gates [B, T, Hq, 3] (contiguous) -> do_c = gates[..., c] * do, branch c's output gradient,
    in do's dtype. NSA's backward makes one branch's at a time, just before that branch's backward, so that at most one
    is held (three at once set the backward's peak memory at long T)."""
    out = torch.empty_like(do)
    rows, dv = do.numel() // do.shape[-1], do.shape[-1]
    grid, meta = _gate_launch(rows, dv)
    _gated_grad_kernel[grid](do, gates, out, rows, dv, c=c, **meta)
    return out
