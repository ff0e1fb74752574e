"""Banded flash attention: the kernels of NSA's compressed branch and sliding-window branch.

One masked attention serves both branches. Key u covers raw positions up to e(u) = u*key_stride + key_span - 1
and query t sees it iff e(u) <= t and (window is None or e(u) > t - window) (see utils.py):
  compressed branch: key_stride = d, key_span = l, window = None (keys are compressed tokens);
  sliding window:    key_stride = 1, key_span = 1, window = w.
The band also bounds every loop: a tile of queries only visits the key blocks it can see (and a key
block only the query blocks that can see it), so the window branch costs O(T * w) and the
compressed branch O(T * Tc / 2). Blocks that every row of the tile sees entirely skip the mask.

Kernels (FlashAttention-2; exp2 with log2(e) folded into the scale; statistics in float32):
  _banded_fwd_kernel      grid (query blocks * Hq, batch)            -> o, lse
  _banded_delta_kernel    grid (query blocks, Hq, batch)             -> delta = rowsum(do * o)
  _banded_dkdv_kernel     grid (key blocks * Hkv * splits, batch)    -> dk, dv
  _banded_dq_kernel       grid (query blocks * Hq, batch)            -> dq
(fwd, dq and dk/dv launch their heaviest blocks first: utils.heaviest_first.)
Every gradient has a single writer program that sums in a fixed order: no float atomics, so the backward
is bitwise reproducible (and on an H100 faster than adding dq atomically from the dk/dv kernel).
GQA: query head h reads key/value head h // G. A dk/dv program owns one key block of one key/value
head and loops over the query heads of its group (split over `splits` programs when there are too
few key blocks to fill the GPU; the partial sums are then added in float32 outside the kernel).
Packed sequences (cu_seqlens): batch 1, the batch grid axis runs over sequences.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..types import KernelOptions
from .utils import (LOG2E, LOG2E_K, LN2_K, check_backward_extras, check_kernel_dtype, dot_precision, interpreting,
                    key_end, keys_upto, heaviest_first, last_dim_contiguous, load_rows, query_offset, query_offsets,
                    seq_bounds, pow2_at_least, softmax_update, visible)


# ----------------------------------------------------------------------------------------------
# Tile helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _store_tile(base, x, rows, n_rows, stride_row, cols, n_cols):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


@triton.jit
def _key_blocks(m0, m_last, Tk, BLOCK_N: tl.constexpr,
                KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr):
    """Keys that queries [m0, m_last] can see, as lo <= full_lo <= full_hi <= hi.

    [lo, full_lo) and [full_hi, hi) need the mask; every query of the tile sees every key of
    [full_lo, full_hi). lo, full_lo (unless == hi) and full_hi (unless == full_lo) are multiples of BLOCK_N.
    """
    hi = tl.minimum(keys_upto(m_last, KEY_STRIDE, KEY_SPAN), Tk)  # e(u) <= m_last
    if WINDOW > 0:
        lo = keys_upto(m0 - WINDOW, KEY_STRIDE, KEY_SPAN) // BLOCK_N * BLOCK_N  # e(u) > m0 - w
        full_lo = tl.cdiv(keys_upto(m_last - WINDOW, KEY_STRIDE, KEY_SPAN), BLOCK_N) * BLOCK_N
    else:
        lo = m0 * 0
        full_lo = lo
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(keys_upto(m0, KEY_STRIDE, KEY_SPAN), hi) // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_blocks(n0, n_last, T, offset, whole_block, BLOCK_M: tl.constexpr,
                  KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr):
    """Query rows that can see keys [n0, n_last], as lo <= full_lo <= full_hi <= hi (as in _key_blocks).

    Row r of the T query rows sits at position r + offset. Every bound is clamped at row 0 (Triton's integer
    division truncates towards zero). whole_block: the key tile holds no padding rows (otherwise no query block
    is treated as unmasked).
    """
    first_end = key_end(n0, KEY_STRIDE, KEY_SPAN) - offset  # as rows
    last_end = key_end(n_last, KEY_STRIDE, KEY_SPAN) - offset
    lo = tl.maximum(first_end, 0) // BLOCK_M * BLOCK_M  # t >= e(n0)
    if WINDOW > 0:
        hi = tl.maximum(tl.minimum(last_end + WINDOW, T), 0)  # t < e(n_last) + w
        full_end = tl.maximum(tl.minimum(first_end + WINDOW, hi), 0)
    else:
        hi = n0 * 0 + T
        full_end = hi
    full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_end, 0), BLOCK_M) * BLOCK_M, lo), hi)
    full_hi = tl.maximum(full_end // BLOCK_M * BLOCK_M, full_lo)
    full_lo = tl.where(whole_block, full_lo, hi)
    full_hi = tl.where(whole_block, full_hi, hi)
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, m_i, l_i, q, Kh, Vh, stride_kt, stride_vt, Tk, t, lo, hi, qk_scale,
               KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi): m_i, l_i in log2 units; acc = sum_u 2^(s - m_i) v_u."""
    cols_k = tl.arange(0, BLOCK_DK)
    cols_v = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        u = start + tl.arange(0, BLOCK_N)
        k = load_rows(Kh, u, u < Tk, stride_kt, cols_k, DK)
        v = load_rows(Vh, u, u < Tk, stride_vt, cols_v, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2(e) * scale * q.k
        if MASK:
            s = tl.where(visible(t[:, None], u[None, :], KEY_STRIDE, KEY_SPAN, WINDOW) & (u < Tk)[None, :],
                         s, float("-inf"))
        m_i, l_i, acc = softmax_update(m_i, l_i, acc, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _banded_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, Q_OFFSETS,
                stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                T, Tk, Hq, G, qk_scale, q_offset,
                KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """o[t] = sum_u softmax_u(scale q_t.k_u) v_u over visible u; lse[t] = log sum_u exp(scale q_t.k_u).

    Q [B, T, Hq, DK], K [B, Tk, Hkv, DK], V [B, Tk, Hkv, DV], O [B, T, Hq, DV], LSE [B, Hq, T] float32; query row t
    sits at position t + offset (utils.query_offset).
    One program: BLOCK_M queries of one head of one sequence; grid (query blocks * Hq, sequences), the last
    query blocks (most keys) first.
    """
    m_block, h = heaviest_first(tl.program_id(0), Hq, tl.num_programs(0) // Hq, True)
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(1), T, IS_VARLEN)
    _, k0, Tk_seq = seq_bounds(CU_K, tl.program_id(1), Tk, IS_VARLEN)
    offset = query_offset(Q_OFFSETS, tl.program_id(1), q_offset, IS_VARLEN)
    m0 = m_block * BLOCK_M
    if m0 >= T_seq:
        return
    Qh = Q + batch * stride_qb + q0 * stride_qt + h * stride_qh
    Kh = K + batch * stride_kb + k0 * stride_kt + (h // G) * stride_kh
    Vh = V + batch * stride_vb + k0 * stride_vt + (h // G) * stride_vh
    t = m0 + tl.arange(0, BLOCK_M)
    q = load_rows(Qh, t, t < T_seq, stride_qt, tl.arange(0, BLOCK_DK), DK)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _key_blocks(m0 + offset, tl.minimum(m0 + BLOCK_M, T_seq) - 1 + offset, Tk_seq,
                                           BLOCK_N, KEY_STRIDE, KEY_SPAN, WINDOW)
    # Key blocks [lo, full_lo) and [full_hi, hi) straddle the band's edges and take the mask; the middle does not.
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, lo, full_lo,
                               qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True,
                               PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, full_lo, full_hi,
                               qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False,
                               PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, full_hi, hi,
                               qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True,
                               PRECISION)

    # A row with no visible key has l_i = 0 and acc = 0: o = 0 and lse = -inf.
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    _store_tile(O + batch * stride_ob + q0 * stride_ot + h * stride_oh, o, t, T_seq, stride_ot,
                tl.arange(0, BLOCK_DV), DV)
    lse = (m_i + tl.log2(l_i)) * LN2_K
    tl.store(LSE + (batch * Hq + h) * T + q0 + t, lse, mask=t < T_seq)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _banded_delta_kernel(O, DO, DELTA, stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh,
                  T, Hq, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[b, h, t] = sum_c do[b, t, h, c] * o[b, t, h, c] (float32). DELTA [B, Hq, T]."""
    h, b = tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_DV)
    o = load_rows(O + b * stride_ob + h * stride_oh, t, t < T, stride_ot, cols, DV)
    do = load_rows(DO + b * stride_dob + h * stride_doh, t, t < T, stride_dot, cols, DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * Hq + h) * T + t, delta, mask=t < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot,
                T, Tk, u, offset, lo, hi, qk_scale,
                KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr,
                DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Adds the query blocks [lo, hi) (rows; row t at position t + offset) of one head to dk, dv of the key tile u
    (transposed scores [BLOCK_N, BLOCK_M]).

    p^T = 2^(s^T - lse); dv += p^T do; ds^T = p^T * (v do^T - delta); dk += ds^T q (scale applied by the caller).
    """
    cols_k = tl.arange(0, BLOCK_DK)
    cols_v = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_M):
        t = start + tl.arange(0, BLOCK_M)
        q = load_rows(Qh, t, t < T, stride_qt, cols_k, DK)
        do = load_rows(DOh, t, t < T, stride_dot, cols_v, DV)
        lse2 = tl.load(LSEh + t, mask=t < T, other=0.0) * LOG2E_K
        delta = tl.load(DELTAh + t, mask=t < T, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        if MASK:
            vis = visible(t[None, :] + offset, u[:, None], KEY_STRIDE, KEY_SPAN, WINDOW)
            p_t = tl.where(vis & (t < T)[None, :] & (u < Tk)[:, None], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _banded_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, CU_Q, CU_K, Q_OFFSETS,
                 stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                 stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                 stride_dks, stride_dkb, stride_dkt, stride_dkh,
                 stride_dvs, stride_dvb, stride_dvt, stride_dvh,
                 T, Tk, Hq, Hkv, G, SPLITS, qk_scale, scale, q_offset,
                 KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
                 DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """dk, dv of BLOCK_N keys of one key/value head, summed over the query heads [split*G/SPLITS, (split+1)*G/SPLITS)
    of its group and over the query blocks that can see them.

    DK_OUT [SPLITS, B, Tk, Hkv, DK], DV_OUT [SPLITS, B, Tk, Hkv, DV] (split s holds the sum over its heads).
    Grid (key blocks * Hkv * SPLITS, sequences), the first key blocks (seen by the most queries) first.
    """
    n_block, head_split = heaviest_first(tl.program_id(0), Hkv * SPLITS, tl.num_programs(0) // (Hkv * SPLITS), False)
    kvh = head_split // SPLITS
    split = head_split % SPLITS
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(1), T, IS_VARLEN)
    _, k0, Tk_seq = seq_bounds(CU_K, tl.program_id(1), Tk, IS_VARLEN)
    offset = query_offset(Q_OFFSETS, tl.program_id(1), q_offset, IS_VARLEN)
    n0 = n_block * BLOCK_N
    if n0 >= Tk_seq:
        return
    u = n0 + tl.arange(0, BLOCK_N)
    cols_k = tl.arange(0, BLOCK_DK)
    cols_v = tl.arange(0, BLOCK_DV)
    k = load_rows(K + batch * stride_kb + k0 * stride_kt + kvh * stride_kh, u, u < Tk_seq, stride_kt, cols_k, DK)
    v = load_rows(V + batch * stride_vb + k0 * stride_vt + kvh * stride_vh, u, u < Tk_seq, stride_vt, cols_v, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, full_lo, full_hi, hi = _query_blocks(n0, tl.minimum(n0 + BLOCK_N, Tk_seq) - 1, T_seq, offset,
                                             n0 + BLOCK_N <= Tk_seq, BLOCK_M, KEY_STRIDE, KEY_SPAN, WINDOW)
    heads = G // SPLITS
    for h in range(kvh * G + split * heads, kvh * G + (split + 1) * heads):
        Qh = Q + batch * stride_qb + q0 * stride_qt + h * stride_qh
        DOh = DO + batch * stride_dob + q0 * stride_dot + h * stride_doh
        LSEh = LSE + (batch * Hq + h) * T + q0
        DELTAh = DELTA + (batch * Hq + h) * T + q0
        # Query blocks [lo, full_lo) and [full_hi, hi) take the mask; the middle does not.
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot,
                             T_seq, Tk_seq, u, offset, lo, full_lo, qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW,
                             DK, DV, BLOCK_M, BLOCK_DK, BLOCK_DV, True, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot,
                             T_seq, Tk_seq, u, offset, full_lo, full_hi, qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW,
                             DK, DV, BLOCK_M, BLOCK_DK, BLOCK_DV, False, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, Qh, DOh, LSEh, DELTAh, stride_qt, stride_dot,
                             T_seq, Tk_seq, u, offset, full_hi, hi, qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW,
                             DK, DV, BLOCK_M, BLOCK_DK, BLOCK_DV, True, PRECISION)
    _store_tile(DK_OUT + split * stride_dks + batch * stride_dkb + k0 * stride_dkt + kvh * stride_dkh,
                dk * scale, u, Tk_seq, stride_dkt, cols_k, DK)
    _store_tile(DV_OUT + split * stride_dvs + batch * stride_dvb + k0 * stride_dvt + kvh * stride_dvh,
                dv, u, Tk_seq, stride_dvt, cols_v, DV)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, Kh, Vh, stride_kt, stride_vt, Tk, t, lo, hi, qk_scale,
              KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr,
              DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """dq += ds k over key blocks [lo, hi), ds = p * (do v^T - delta), p = 2^(s - lse) (scale applied by the caller)."""
    cols_k = tl.arange(0, BLOCK_DK)
    cols_v = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        u = start + tl.arange(0, BLOCK_N)
        k = load_rows(Kh, u, u < Tk, stride_kt, cols_k, DK)
        v = load_rows(Vh, u, u < Tk, stride_vt, cols_v, DV)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(visible(t[:, None], u[None, :], KEY_STRIDE, KEY_SPAN, WINDOW) & (u < Tk)[None, :], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _banded_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, Q_OFFSETS,
               stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
               stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
               stride_dqb, stride_dqt, stride_dqh,
               T, Tk, Hq, G, qk_scale, scale, q_offset,
               KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr,
               DK: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
    """dq of BLOCK_M queries of one head: dq[t] = scale * sum_u ds[t, u] k_u over the visible keys. DQ [B, T, Hq, DK];
    ACCUMULATE: DQ += dq (in float32, rounded once).

    Grid (query blocks * Hq, sequences), the last query blocks (most keys) first.
    """
    m_block, h = heaviest_first(tl.program_id(0), Hq, tl.num_programs(0) // Hq, True)
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(1), T, IS_VARLEN)
    _, k0, Tk_seq = seq_bounds(CU_K, tl.program_id(1), Tk, IS_VARLEN)
    offset = query_offset(Q_OFFSETS, tl.program_id(1), q_offset, IS_VARLEN)
    m0 = m_block * BLOCK_M
    if m0 >= T_seq:
        return
    Kh = K + batch * stride_kb + k0 * stride_kt + (h // G) * stride_kh
    Vh = V + batch * stride_vb + k0 * stride_vt + (h // G) * stride_vh
    t = m0 + tl.arange(0, BLOCK_M)
    q = load_rows(Q + batch * stride_qb + q0 * stride_qt + h * stride_qh, t, t < T_seq, stride_qt,
                   tl.arange(0, BLOCK_DK), DK)
    do = load_rows(DO + batch * stride_dob + q0 * stride_dot + h * stride_doh, t, t < T_seq, stride_dot,
                    tl.arange(0, BLOCK_DV), DV)
    lse2 = tl.load(LSE + (batch * Hq + h) * T + q0 + t, mask=t < T_seq, other=0.0) * LOG2E_K
    delta = tl.load(DELTA + (batch * Hq + h) * T + q0 + t, mask=t < T_seq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    lo, full_lo, full_hi, hi = _key_blocks(m0 + offset, tl.minimum(m0 + BLOCK_M, T_seq) - 1 + offset, Tk_seq,
                                           BLOCK_N, KEY_STRIDE, KEY_SPAN, WINDOW)
    dq = _dq_inner(dq, q, do, lse2, delta, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, lo, full_lo,
                   qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, full_lo, full_hi,
                   qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, Kh, Vh, stride_kt, stride_vt, Tk_seq, t + offset, full_hi, hi,
                   qk_scale, KEY_STRIDE, KEY_SPAN, WINDOW, DK, DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)
    DQh = DQ + batch * stride_dqb + q0 * stride_dqt + h * stride_dqh
    dq = dq * scale
    if ACCUMULATE:
        dq += load_rows(DQh, t, t < T_seq, stride_dqt, tl.arange(0, BLOCK_DK), DK).to(tl.float32)
    _store_tile(DQh, dq, t, T_seq, stride_dqt, tl.arange(0, BLOCK_DK), DK)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def launch_params(head_dim_k: int, head_dim_v: int, options: KernelOptions = KernelOptions()) -> dict:
    """Block sizes and launch shape of each kernel for the given head dims (padded to powers of two), with the
    overrides of options.banded_fwd / banded_dkdv / banded_dq.

    Interpreter: 16 x 16 tiles (tl.dot's minimum on the GPU), so that small tests cross many blocks.
    """
    tiles = dict(block_m="BLOCK_M", block_n="BLOCK_N")
    choice = _default_launch(head_dim_k, head_dim_v)
    choice["fwd"] = options.banded_fwd.over(choice["fwd"], **tiles)
    choice["dkdv"] = options.banded_dkdv.over(choice["dkdv"], **tiles)
    choice["dq"] = options.banded_dq.over(choice["dq"], **tiles)
    return choice


def _default_launch(head_dim_k: int, head_dim_v: int) -> dict:
    dk, dv = pow2_at_least(head_dim_k), pow2_at_least(head_dim_v)  # tl.dot needs K, N >= 16 on the GPU
    if interpreting():
        tile = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return dict(fwd=tile, dkdv=tile, dq=tile, delta=dict(BLOCK_M=16, num_warps=1), BLOCK_DK=dk, BLOCK_DV=dv)
    wide = max(dk, dv) > 128
    if wide:
        fwd = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8, num_stages=2)
        dkdv = dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2)
    else:  # benchmarks/tune_kernels.py, H100, shape P at 64k (BENCHMARKS.md)
        fwd = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)
        dkdv = dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)
    return dict(
        fwd=fwd, dkdv=dkdv,
        dq=dict(BLOCK_M=64, BLOCK_N=32 if wide else 64, num_warps=8 if wide else 4, num_stages=2),
        delta=dict(BLOCK_M=64, num_warps=4),
        BLOCK_DK=dk, BLOCK_DV=dv,
    )


def _band_args(key_stride, key_span, window):
    if key_stride < 1 or key_span < 1:
        raise ValueError(f"key_stride and key_span must be >= 1, got {key_stride}, {key_span}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    return dict(KEY_STRIDE=int(key_stride), KEY_SPAN=int(key_span), WINDOW=0 if window is None else int(window))


def _keys_upto(t: int, key_stride: int, key_span: int) -> int:
    return max(t - key_span + 1 + key_stride, 0) // key_stride


def _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, q_offset, q_offsets):
    """(grid batch extent, max query rows of one sequence, whether packed), checking the varlen arguments."""
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    if q_offset < 0:
        raise ValueError(f"q_offset (the position of the first query among the keys) must be >= 0, got {q_offset}")
    if cu_seqlens_q is None:
        if q_offsets is not None:
            raise ValueError("q_offsets is for packed batches (with cu_seqlens_q); dense ones take q_offset")
        return q.shape[0], q.shape[1], False
    if q_offset:
        raise ValueError("packed batches take their query offsets as q_offsets (int32 [N]), not q_offset")
    if q.shape[0] != 1 or k.shape[0] != 1:
        raise ValueError("packed sequences need batch 1 inputs")
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    return cu_seqlens_q.numel() - 1, int(max_seqlen_q), True


def _strides(x):
    return x.stride(0), x.stride(1), x.stride(2)


def branch_band(branch: str, config) -> dict:
    """Band keywords (key_stride, key_span, window) of NSA's "cmp" or "swa" branch for the banded kernels.

    Compressed token i ends at raw position i*d + l - 1 and stays visible; raw key u ends at u and
    stays visible for w positions.
    """
    if branch == "cmp":
        return dict(key_stride=config.cmp_stride, key_span=config.cmp_block, window=None)
    if branch == "swa":
        return dict(key_stride=1, key_span=1, window=config.window)
    raise ValueError(f"branch must be 'cmp' or 'swa', got {branch!r}")


def banded_attention_fwd(q, k, v, scale, *, key_stride, key_span, window=None,
                         cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, q_offset=0, q_offsets=None,
                         options: KernelOptions = KernelOptions()):
    """Banded attention forward.

    q [B, T, Hq, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv] (Hq % Hkv == 0), float16/bfloat16/float32.
    Packed: B == 1 and cu_seqlens_q, cu_seqlens_k int32 [N + 1] (positions restart at 0 per sequence).
    Suffix queries: query row t sits at raw position t + q_offset (dense) or t + q_offsets[s] (packed, int32 [N]);
    0 when the queries are the whole sequence.
    Returns o [B, T, Hq, Dv] (q's dtype) and lse [B, Hq, T] float32 (natural log; -inf where nothing is visible).
    options: launch overrides (KernelOptions.banded_*).
    """
    check_kernel_dtype(q, k, v)
    q, k, v = (last_dim_contiguous(x) for x in (q, k, v))
    B, T, Hq, Dk = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    band = _band_args(key_stride, key_span, window)
    nb, max_t, varlen = _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, q_offset, q_offsets)
    o = torch.empty(B, T, Hq, Dv, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
    if T == 0:
        return o, lse
    cfg = launch_params(Dk, Dv, options)
    fwd = cfg["fwd"]
    grid = (triton.cdiv(max_t, fwd["BLOCK_M"]) * Hq, nb)
    _banded_fwd_kernel[grid](
        q, k, v, o, lse, cu_seqlens_q, cu_seqlens_k, query_offsets(cu_seqlens_q, q_offsets),
        *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        T, Tk, Hq, Hq // Hkv, scale * LOG2E, q_offset,
        **band, IS_VARLEN=varlen, DK=Dk, DV=Dv, BLOCK_DK=cfg["BLOCK_DK"], BLOCK_DV=cfg["BLOCK_DV"],
        PRECISION=dot_precision(q.dtype), **fwd)
    return o, lse


def _dkdv_splits(programs: int, G: int, device: torch.device) -> int:
    """Query-head splits of the dk/dv grid: the smallest divisor s of G giving about four programs per SM.

    Few key blocks (the compressed branch: Tc = T / d keys) would otherwise leave SMs idle, and the work
    per key block is uneven (early compressed tokens are seen by every later query).
    """
    if device.type != "cuda":
        return 1
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return next((s for s in range(1, G + 1) if G % s == 0 and programs * s >= target), G)


def banded_attention_bwd(do, q, k, v, o, lse, scale, *, key_stride, key_span, window=None,
                         cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, q_offset=0, q_offsets=None,
                         max_query_end=None, head_splits=None, delta=None, add_dq_to=None, dq_after=None,
                         options: KernelOptions = KernelOptions()):
    """Banded attention backward: (dq, dk, dv) in the dtypes of q, k, v, bitwise reproducible.

    do, o [B, T, Hq, Dv] and lse [B, Hq, T] as returned by banded_attention_fwd; other arguments as there.
    delta float32 [B, Hq, T]: rowsum(do * o), made here unless given (NSA's gate kernel makes all three branches'; o is
    then not read); add_dq_to [B, T, Hq, Dk] (contiguous, q's dtype): dq is added to it in place and it is returned.
    dk, dv come from a key-major kernel, dq from a separate query-major one, launched in that order; dq_after (a
    torch.cuda.Event) makes the dq kernel wait for it first, when add_dq_to is written on another stream.
    head_splits (default: chosen for the GPU) splits each group's query heads over that many dk/dv programs; it must
    divide Hq // Hkv.
    max_query_end: the largest raw length of a sequence (its last query's position + 1), bounding the keys that get
    a gradient; packed batches with q_offsets should pass it (else it is read from the device).
    """
    check_kernel_dtype(q, k, v, do)
    q, k, v, o, do = (last_dim_contiguous(x) for x in (q, k, v, o, do))
    lse = lse.contiguous()
    B, T, Hq, Dk = q.shape
    Tk, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    check_backward_extras(q, delta, add_dq_to)
    band = _band_args(key_stride, key_span, window)
    nb, max_t, varlen = _layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, q_offset, q_offsets)
    if max_query_end is None:
        max_query_end = max_t + (int(q_offsets.max()) if q_offsets is not None and q_offsets.numel() else q_offset)
    q_offsets = query_offsets(cu_seqlens_q, q_offsets)
    cfg = launch_params(Dk, Dv, options)
    meta = dict(**band, IS_VARLEN=varlen, DK=Dk, DV=Dv, BLOCK_DK=cfg["BLOCK_DK"], BLOCK_DV=cfg["BLOCK_DV"],
                PRECISION=dot_precision(q.dtype))

    if delta is not None:
        delta = delta.contiguous()
    else:
        delta = torch.empty(B, Hq, T, device=q.device, dtype=torch.float32)
        dcfg = cfg["delta"]
        if T:
            _banded_delta_kernel[(triton.cdiv(T, dcfg["BLOCK_M"]), Hq, B)](
                o, do, delta, *_strides(o), *_strides(do), T, Hq, DV=Dv, BLOCK_DV=cfg["BLOCK_DV"], **dcfg)

    # Keys past the last one the longest sequence can see get no gradient: no program for them.
    max_k = min(Tk, _keys_upto(max_query_end - 1, key_stride, key_span))
    kv_cfg = cfg["dkdv"]
    programs = triton.cdiv(max_k, kv_cfg["BLOCK_N"]) * Hkv * nb
    splits = head_splits or _dkdv_splits(programs, G, q.device)
    if G % splits:
        raise ValueError(f"head_splits ({splits}) must divide the group size {G}")
    part_dtype = torch.float32 if splits > 1 else None
    dk = torch.zeros(splits, B, Tk, Hkv, Dk, device=q.device, dtype=part_dtype or k.dtype)
    dv = torch.zeros(splits, B, Tk, Hkv, Dv, device=q.device, dtype=part_dtype or v.dtype)
    qk_scale = scale * LOG2E
    if programs:
        _banded_dkdv_kernel[(triton.cdiv(max_k, kv_cfg["BLOCK_N"]) * Hkv * splits, nb)](
            q, k, v, do, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, q_offsets,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do),
            *dk.stride()[:4], *dv.stride()[:4],
            T, Tk, Hq, Hkv, G, splits, qk_scale, scale, q_offset, **meta, **kv_cfg)
    dq = torch.empty_like(q) if add_dq_to is None else add_dq_to
    if dq_after is not None:
        torch.cuda.current_stream(q.device).wait_event(dq_after)
    if T:
        q_cfg = cfg["dq"]
        _banded_dq_kernel[(triton.cdiv(max_t, q_cfg["BLOCK_M"]) * Hq, nb)](
            q, k, v, do, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, q_offsets,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            T, Tk, Hq, G, qk_scale, scale, q_offset, ACCUMULATE=add_dq_to is not None, **meta, **q_cfg)
    dk = dk[0] if splits == 1 else dk.sum(0).to(k.dtype)
    dv = dv[0] if splits == 1 else dv.sum(0).to(v.dtype)
    return dq, dk, dv
