"""Selected attention (NSA branch 2, SPEC.md) in Triton: forward and backward.

Math. Query t, head h (KV group g = h // G) attends to the raw tokens u of the blocks its group
selected, block_ids[t, g] (ascending, -1 in unused trailing slots), with u <= t:
    s[h, t, u] = scale * q[t, h] . k[u, g],   p = softmax_u(s),   o[t, h] = sum_u p * v[u, g],
    lse[h, t] = log sum_u exp(s)  (-inf and o = 0 when a row sees nothing).
Backward (FlashAttention's identities): delta = rowsum(do * o), dp = do . v, ds = p * (dp - delta),
    dq = scale * sum_u ds k,   dk[u] = scale * sum_{t,h} ds q,   dv[u] = sum_{t,h} p do.

Layout of the work (the paper's group-centric kernel, generalized to any G). One program owns a
tile of BLOCK_T consecutive queries of one KV group; its M = BLOCK_T * G rows (padded to a power
of two, at least 16 so that tl.dot fills the matrix units) are the (query, head) pairs of the tile.
The program walks the union of the blocks its queries selected, in ascending order, with a k-way
merge over the sorted rows of block_ids: each step takes the smallest pending id, loads that KV
block once for all M rows, and masks out the rows that did not select it. With G >= 16,
BLOCK_T = 1 and this is exactly the paper's kernel (one query, its G heads, n blocks); with small
G, neighbouring queries share most of their blocks (the forced ones at least), so the union stays
close to n and every KV load serves BLOCK_T * G rows.

Backward, dq (and delta): the same query-major walk, recomputing p from the saved lse.
Backward, dk/dv: a scatter from queries to the blocks they chose, done as a gather with no float
atomics. The inverse index (for each (sequence, group, block) the ascending list of the queries that
selected it) is built with a stable torch.sort; the lists are cut into work items of at most `chunk`
queries (so block 0, selected by every query, does not serialize on one program); a kv-block-major
kernel gathers each item's queries and writes a float32 partial dk/dv per item; a reduction kernel
sums the items of each block in a fixed order. Gradients are bitwise reproducible (and on an H100
faster than adding dk/dv atomically from the query-major walk); extra memory is the partials, about
1.5-2x the size of dk and dv in float32.

All kernels assume contiguous tensors (the wrappers make them so). Head dims are padded to a power
of two >= 16 with masks (so Dk = 192 runs as 256); head dims above 256 are rejected.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..types import KernelOptions
from .utils import LN2_K, LOG2E, LOG2E_K, MAX_HEAD_DIM, dot_precision, pow2_at_least

# Rows (query, head pairs) per program: the query-major kernels (forward, dq) take ceil(TILE_ROWS / G)
# consecutive queries, whose block union grows when neighbours disagree, so 16 (the tl.dot minimum);
# the kv-major kernel gathers queries that all selected its block, so a larger tile wastes nothing.
TILE_ROWS = 16
KV_TILE_ROWS = 64
# Launch options of the forward, dq and kv-major kernels (benchmarks/tune_kernels.py, H100, shape P at 64k);
# KernelOptions.selected_* override them.
FWD_LAUNCH = dict(num_warps=2, num_stages=3)
DQ_LAUNCH = dict(num_warps=2, num_stages=3)
KV_LAUNCH = dict(num_warps=4, num_stages=2)


def query_tile(G: int, min_rows: int = TILE_ROWS) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_M): queries per program and padded rows (BLOCK_T * G <= BLOCK_M, a power of two)."""
    block_t = max(1, min_rows // G)
    return block_t, pow2_at_least(block_t * G)


def _check_head_dims(dk: int, dv: int) -> None:
    if max(dk, dv) > MAX_HEAD_DIM:
        raise ValueError(f"triton selected attention supports head dims up to {MAX_HEAD_DIM}, got Dk={dk}, Dv={dv}")


# ----------------------------------------------------------------------------------------------
# Shared jit helpers


@triton.jit
def _sequence(CU, pid_b, T, HQ, IS_VARLEN: tl.constexpr):
    """(tok0, seqlen, lse0): first global token of the sequence, its length, and the offset of its
    head-0 row in lse [B, HQ, T] (lse index = lse0 + h * T + t)."""
    if IS_VARLEN:
        tok0 = tl.load(CU + pid_b).to(tl.int64)
        seqlen = tl.load(CU + pid_b + 1) - tl.load(CU + pid_b)
        lse0 = tok0
    else:
        tok0 = pid_b.to(tl.int64) * T  # int64: B * T * H * D may exceed 2^31
        seqlen = T
        lse0 = pid_b.to(tl.int64) * HQ * T
    return tok0, seqlen, lse0


@triton.jit
def _next_ids(BID, bid_row, ptr, row_ok, N_SLOTS: tl.constexpr, NO_BLOCK: tl.constexpr):
    """Each row's pending block id (slot `ptr` of its sorted row of block_ids), NO_BLOCK when done."""
    ids = tl.load(BID + bid_row + ptr, mask=row_ok & (ptr < N_SLOTS), other=-1)
    return tl.where(ids >= 0, ids, NO_BLOCK)


@triton.jit
def _block_scores(q, K, tok0, k_row, blk, s0, seqlen, t, sel, qk_scale, DK, HKV_DK,
                  SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores (log2 domain) of the rows against keys s0 .. s0 + BLOCK_N of block `blk`, -inf where not
    visible: row selected the block (sel), key inside the block and the sequence, and u <= t.
    Returns (s [M, BLOCK_N], u [BLOCK_N], key_ok [BLOCK_N], k [BLOCK_N, BLOCK_DK])."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DK)
    u = blk * SLC_BLOCK + s0 + offs_n
    key_ok = (s0 + offs_n < SLC_BLOCK) & (u < seqlen)
    k = tl.load(K + (tok0 + u)[:, None] * HKV_DK + k_row + offs_d[None, :],
                mask=key_ok[:, None] & (offs_d[None, :] < DK), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    visible = sel[:, None] & key_ok[None, :] & (u[None, :] <= t[:, None])
    return tl.where(visible, s, float("-inf")), u, key_ok, k


@triton.jit
def _rows(pid_t, g, BLOCK_T: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, seqlen):
    """Row r of a query tile is query t = pid_t * BLOCK_T + r // G, head h = g * G + r % G."""
    r = tl.arange(0, BLOCK_M)
    t = pid_t * BLOCK_T + r // G
    h = g * G + r % G
    row_ok = (r < BLOCK_T * G) & (t < seqlen)
    return t, h, row_ok


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_kernel(Q, K, V, BID, O, LSE, CU, qk_scale, T, HQ, HKV, DK, DV,
                G: tl.constexpr, N_SLOTS: tl.constexpr, SLC_BLOCK: tl.constexpr, NO_BLOCK: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """grid (cdiv(T or max_seqlen, BLOCK_T), B or N sequences, HKV); online softmax over the union of blocks."""
    pid_t, pid_b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok0, seqlen, lse0 = _sequence(CU, pid_b, T, HQ, IS_VARLEN)
    if pid_t * BLOCK_T >= seqlen:
        return
    t, h, row_ok = _rows(pid_t, g, BLOCK_T, G, BLOCK_M, seqlen)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + (tok0 + t)[:, None] * (HQ * DK) + h[:, None] * DK + offs_dk[None, :],
                mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
    bid_row = (tok0 + t) * (HKV * N_SLOTS) + g * N_SLOTS

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 domain
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    ptr = tl.zeros([BLOCK_M], tl.int32)
    nxt = _next_ids(BID, bid_row, ptr, row_ok, N_SLOTS, NO_BLOCK)
    blk = tl.min(nxt, axis=0)
    while blk < NO_BLOCK:  # k-way merge: blocks of the union, ascending
        sel = nxt == blk
        for s0 in range(0, SLC_BLOCK, BLOCK_N):
            s, u, key_ok, k = _block_scores(q, K, tok0, g * DK, blk, s0, seqlen, t, sel, qk_scale, DK, HKV * DK,
                                            SLC_BLOCK, BLOCK_N, BLOCK_DK, DOT_PREC)
            v = tl.load(V + (tok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :],
                        mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay at 0
            alpha = tl.exp2(m_i - m_ref)
            p = tl.exp2(s - m_ref[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        ptr += sel.to(tl.int32)
        nxt = _next_ids(BID, bid_row, ptr, row_ok, N_SLOTS, NO_BLOCK)
        blk = tl.min(nxt, axis=0)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_K, float("-inf"))
    tl.store(O + (tok0 + t)[:, None] * (HQ * DV) + h[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + lse0 + h * T + t, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_dq_kernel(Q, K, V, BID, O, DO, LSE, DQ, DELTA, CU, qk_scale, scale, T, HQ, HKV, DK, DV,
                   G: tl.constexpr, N_SLOTS: tl.constexpr, SLC_BLOCK: tl.constexpr, NO_BLOCK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """Query-major backward, grid as the forward: dq = scale * sum_u ds k over the union of blocks,
    and delta = rowsum(do * o) stored to DELTA [B, HQ, T] for the kv-major kernel."""
    pid_t, pid_b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok0, seqlen, lse0 = _sequence(CU, pid_b, T, HQ, IS_VARLEN)
    if pid_t * BLOCK_T >= seqlen:
        return
    t, h, row_ok = _rows(pid_t, g, BLOCK_T, G, BLOCK_M, seqlen)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_mask = row_ok[:, None] & (offs_dk[None, :] < DK)
    dv_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    q_off = (tok0 + t)[:, None] * (HQ * DK) + h[:, None] * DK + offs_dk[None, :]
    o_off = (tok0 + t)[:, None] * (HQ * DV) + h[:, None] * DV + offs_dv[None, :]
    q = tl.load(Q + q_off, mask=dk_mask, other=0.0)
    do = tl.load(DO + o_off, mask=dv_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * tl.load(O + o_off, mask=dv_mask, other=0.0).to(tl.float32), axis=1)
    lse = tl.load(LSE + lse0 + h * T + t, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E_K  # empty rows: p = 0 below anyway
    tl.store(DELTA + lse0 + h * T + t, delta, mask=row_ok)
    bid_row = (tok0 + t) * (HKV * N_SLOTS) + g * N_SLOTS

    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    ptr = tl.zeros([BLOCK_M], tl.int32)
    nxt = _next_ids(BID, bid_row, ptr, row_ok, N_SLOTS, NO_BLOCK)
    blk = tl.min(nxt, axis=0)
    while blk < NO_BLOCK:
        sel = nxt == blk
        for s0 in range(0, SLC_BLOCK, BLOCK_N):
            s, u, key_ok, k = _block_scores(q, K, tok0, g * DK, blk, s0, seqlen, t, sel, qk_scale, DK, HKV * DK,
                                            SLC_BLOCK, BLOCK_N, BLOCK_DK, DOT_PREC)
            v = tl.load(V + (tok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :],
                        mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            p = tl.where(s > float("-inf"), tl.exp2(s - lse2[:, None]), 0.0)  # [M, N]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
        ptr += sel.to(tl.int32)
        nxt = _next_ids(BID, bid_row, ptr, row_ok, N_SLOTS, NO_BLOCK)
        blk = tl.min(nxt, axis=0)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=dk_mask)


@triton.jit
def _bwd_kv_kernel(Q, K, V, DO, LSE, DELTA, QLIST, ITEM_KEY, ITEM_LO, ITEM_HI, PDK, PDV, CU,
                   qk_scale, scale, T, HQ, HKV, DK, DV, NUM_BLOCKS,
                   G: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """kv-major backward, grid (work items,). Item i covers the queries
    QLIST[ITEM_LO[i] : ITEM_HI[i]] (global token ids, ascending) that selected block
    key = (sequence * HKV + g) * NUM_BLOCKS + j; it writes the item's partial dk/dv of that block
    (BLOCK_S >= SLC_BLOCK rows) to PDK [items, BLOCK_S, BLOCK_DK] / PDV [items, BLOCK_S, BLOCK_DV]."""
    item = tl.program_id(0).to(tl.int64)
    key = tl.load(ITEM_KEY + item)
    lo = tl.load(ITEM_LO + item)
    hi = tl.load(ITEM_HI + item)
    j = key % NUM_BLOCKS
    g = (key // NUM_BLOCKS) % HKV
    tok0, seqlen, lse0 = _sequence(CU, key // (NUM_BLOCKS * HKV), T, HQ, IS_VARLEN)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    u = j * SLC_BLOCK + offs_s
    key_ok = (offs_s < SLC_BLOCK) & (u < seqlen)
    k = tl.load(K + (tok0 + u)[:, None] * (HKV * DK) + g * DK + offs_dk[None, :],
                mask=key_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
    v = tl.load(V + (tok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    r = tl.arange(0, BLOCK_M)  # row r: query QLIST[i0 + r // G], head g * G + r % G
    h = g * G + r % G
    i0 = lo
    while i0 < hi:  # (a while loop: Triton's interpreter cannot range() over loaded bounds)
        idx = i0 + r // G
        row_ok = (r < BLOCK_Q * G) & (idx < hi)
        tok = tl.load(QLIST + idx, mask=row_ok, other=0).to(tl.int64)
        t = tok - tok0
        q = tl.load(Q + tok[:, None] * (HQ * DK) + h[:, None] * DK + offs_dk[None, :],
                    mask=row_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
        do = tl.load(DO + tok[:, None] * (HQ * DV) + h[:, None] * DV + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse2 = tl.load(LSE + lse0 + h * T + t, mask=row_ok, other=0.0) * LOG2E_K
        delta = tl.load(DELTA + lse0 + h * T + t, mask=row_ok, other=0.0)
        visible = row_ok[:, None] & key_ok[None, :] & (u[None, :] <= t[:, None])
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)  # [M, S]
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PREC) - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        i0 += BLOCK_Q
    tl.store(PDK + item * (BLOCK_S * BLOCK_DK) + offs_s[:, None] * BLOCK_DK + offs_dk[None, :], dk * scale)
    tl.store(PDV + item * (BLOCK_S * BLOCK_DV) + offs_s[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def _bwd_kv_reduce_kernel(PDK, PDV, KEY_ITEMS, DKO, DVO, CU, T, HKV, DK, DV, NUM_BLOCKS,
                          SLC_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr,
                          BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """grid (sequences * HKV * NUM_BLOCKS,): dk/dv of block `key` = sum of its items' partials
    KEY_ITEMS[key] .. KEY_ITEMS[key + 1] - 1 in increasing order (zero when nobody selected it)."""
    key = tl.program_id(0)
    j = key % NUM_BLOCKS
    g = (key // NUM_BLOCKS) % HKV
    tok0, seqlen, _ = _sequence(CU, key // (NUM_BLOCKS * HKV), T, 1, IS_VARLEN)
    if j * SLC_BLOCK >= seqlen:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    item = tl.load(KEY_ITEMS + key).to(tl.int64)
    end = tl.load(KEY_ITEMS + key + 1)
    while item < end:
        dk += tl.load(PDK + item * (BLOCK_S * BLOCK_DK) + offs_s[:, None] * BLOCK_DK + offs_dk[None, :])
        dv += tl.load(PDV + item * (BLOCK_S * BLOCK_DV) + offs_s[:, None] * BLOCK_DV + offs_dv[None, :])
        item += 1
    u = j * SLC_BLOCK + offs_s
    key_ok = (offs_s < SLC_BLOCK) & (u < seqlen)
    tl.store(DKO + (tok0 + u)[:, None] * (HKV * DK) + g * DK + offs_dk[None, :], dk.to(DKO.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dk[None, :] < DK))
    tl.store(DVO + (tok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :], dv.to(DVO.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------
# Host wrappers


def _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen):
    B, T, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    _check_head_dims(DK, DV)
    if HQ % HKV:
        raise ValueError(f"query heads ({HQ}) must be a multiple of key/value heads ({HKV})")
    if block_ids.shape[:3] != (B, T, HKV):
        raise ValueError(f"block_ids must be [B, T, Hkv, n] = [{B}, {T}, {HKV}, n], got {tuple(block_ids.shape)}")
    if cu_seqlens is None:
        return B, T, max(T, 1)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return cu_seqlens.numel() - 1, T, max(int(max_seqlen), 1)


def _meta(G, DK, DV, block_size, n, dtype):
    block_t, block_m = query_tile(G)
    return dict(G=G, N_SLOTS=n, SLC_BLOCK=block_size, NO_BLOCK=2 ** 30, BLOCK_T=block_t, BLOCK_M=block_m,
                BLOCK_N=min(pow2_at_least(block_size), 64), BLOCK_DK=pow2_at_least(DK), BLOCK_DV=pow2_at_least(DV),
                DOT_PREC=dot_precision(dtype))


def selected_attention_fwd(q, k, v, block_ids, scale, block_size, *, cu_seqlens=None, max_seqlen=None,
                           options: KernelOptions = KernelOptions()):
    """q [B, T, Hq, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], block_ids int32 [B, T, Hkv, n]
    (ascending, -1 trailing) -> o [B, T, Hq, Dv] (q's dtype), lse [B, Hq, T] float32 (natural log).
    Packed sequences: B = 1, cu_seqlens int32 [N + 1]; block ids and positions are per sequence."""
    q, k, v, block_ids = (x.contiguous() for x in (q, k, v, block_ids.to(torch.int32)))
    nb, T, max_len = _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen)
    B, _, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    meta = _meta(HQ // HKV, DK, DV, block_size, block_ids.shape[3], q.dtype)
    o = torch.zeros(B, T, HQ, DV, device=q.device, dtype=q.dtype)
    lse = torch.full((B, HQ, T), float("-inf"), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(max_len, meta["BLOCK_T"]), nb, HKV)
    _fwd_kernel[grid](q, k, v, block_ids, o, lse, cu_seqlens, scale * LOG2E, T, HQ, HKV, DK, DV,
                      IS_VARLEN=cu_seqlens is not None, **meta, **options.selected_fwd.over(FWD_LAUNCH))
    return o, lse


def _inverse_index(block_ids, cu_seqlens, T, num_blocks, chunk):
    """For every key (sequence, group, block j) the ascending global token ids of the queries that selected
    it (QLIST), cut into work items of at most `chunk` queries. Returns (QLIST, ITEM_KEY, ITEM_LO, ITEM_HI,
    KEY_ITEMS) with KEY_ITEMS [keys + 1] the first item of each key. Only deterministic torch ops."""
    B, _, HKV, n = block_ids.shape
    dev = block_ids.device
    tok = torch.arange(B * T, device=dev)
    if cu_seqlens is None:
        seq = tok // T
        nseq = B
    else:
        seq = torch.searchsorted(cu_seqlens[1:].long(), tok, right=True)
        nseq = cu_seqlens.numel() - 1
    ids = block_ids.reshape(B * T, HKV, n).long()
    g = torch.arange(HKV, device=dev)[None, :, None]
    keys = (seq[:, None, None] * HKV + g) * num_blocks + ids
    valid = ids >= 0
    # flattened (token, group, slot) order + stable sort => tokens ascending inside every key
    sorted_keys, order = torch.sort(keys[valid], stable=True)
    qlist = tok[:, None, None].expand_as(keys)[valid][order].to(torch.int32)
    num_keys = nseq * HKV * num_blocks
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, device=dev))
    counts = bounds[1:] - bounds[:-1]
    items_per_key = (counts + chunk - 1) // chunk
    key_items = torch.zeros(num_keys + 1, device=dev, dtype=torch.long)
    key_items[1:] = torch.cumsum(items_per_key, 0)
    num_items = int(key_items[-1])
    item_key = torch.repeat_interleave(torch.arange(num_keys, device=dev), items_per_key, output_size=num_items)
    lo = bounds[item_key] + (torch.arange(num_items, device=dev) - key_items[item_key]) * chunk
    hi = torch.minimum(lo + chunk, bounds[item_key + 1])
    i32 = torch.int32
    return qlist, item_key.to(i32), lo.to(i32), hi.to(i32), key_items.to(i32)


def selected_attention_bwd(do, q, k, v, o, lse, block_ids, scale, block_size, *, cu_seqlens=None, max_seqlen=None,
                           chunk=None, options: KernelOptions = KernelOptions()):
    """Gradients of selected_attention_fwd: (dq, dk, dv) in the dtypes of q, k, v, bitwise reproducible.

    dq query-major, dk/dv kv-major over the inverse index, no float atomics.
    chunk: queries per kv-major work item (default from the average load)."""
    q, k, v, o, do, block_ids = (x.contiguous() for x in (q, k, v, o, do, block_ids.to(torch.int32)))
    lse = lse.contiguous()
    nb, T, max_len = _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen)
    B, _, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    G = HQ // HKV
    meta = _meta(G, DK, DV, block_size, block_ids.shape[3], q.dtype)
    varlen = cu_seqlens is not None
    dq = torch.empty_like(q)
    grid = (triton.cdiv(max_len, meta["BLOCK_T"]), nb, HKV)
    qk_scale = scale * LOG2E
    delta = torch.zeros(B, HQ, T, device=q.device, dtype=torch.float32)
    _bwd_dq_kernel[grid](q, k, v, block_ids, o, do, lse, dq, delta, cu_seqlens, qk_scale, scale,
                         T, HQ, HKV, DK, DV, IS_VARLEN=varlen, **meta, **options.selected_dq.over(DQ_LAUNCH))
    num_blocks = triton.cdiv(max_len, block_size)
    if chunk is None:  # about twice the average queries per block: most blocks take one item
        chunk = max(256, 2 * block_ids.shape[3] * block_size)
    qlist, item_key, lo, hi, key_items = _inverse_index(block_ids, cu_seqlens, T, num_blocks, chunk)
    block_s, block_dk, block_dv = pow2_at_least(block_size), meta["BLOCK_DK"], meta["BLOCK_DV"]
    num_items = item_key.numel()
    pdk = torch.empty(num_items, block_s, block_dk, device=q.device, dtype=torch.float32)
    pdv = torch.empty(num_items, block_s, block_dv, device=q.device, dtype=torch.float32)
    kv = options.selected_dkdv.over(dict(BLOCK_M=KV_TILE_ROWS, **KV_LAUNCH), block_m="BLOCK_M")
    block_q, block_m = query_tile(G, kv.pop("BLOCK_M"))
    if num_items:
        _bwd_kv_kernel[(num_items,)](q, k, v, do, lse, delta, qlist, item_key, lo, hi, pdk, pdv, cu_seqlens,
                                     qk_scale, scale, T, HQ, HKV, DK, DV, num_blocks, G=G, SLC_BLOCK=block_size,
                                     BLOCK_S=block_s, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_DK=block_dk,
                                     BLOCK_DV=block_dv, IS_VARLEN=varlen, DOT_PREC=meta["DOT_PREC"], **kv)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    _bwd_kv_reduce_kernel[(nb * HKV * num_blocks,)](pdk, pdv, key_items, dk, dv, cu_seqlens, T, HKV, DK, DV, num_blocks,
                                                    SLC_BLOCK=block_size, BLOCK_S=block_s, BLOCK_DK=block_dk,
                                                    BLOCK_DV=block_dv, IS_VARLEN=varlen)
    return dq, dk, dv
