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
The program walks the union of the blocks its queries selected, one block per trip of a `for` loop
whose trip count (the union's size) is known on entry, so Triton software-pipelines the block loads
(a k-way merge in a `while` loop, as before, left every load exposed); each block is loaded once for
all M rows and the rows that did not select it are masked out. The unions are made on the device
before the launch (_tile_unions: sort, drop repeats, sort; no host sync). With BLOCK_T = 1 (a 16-row tile at
G = 16) the union is the query's own row of block_ids, exactly the paper's kernel (one query, its G heads, n
blocks). By default a tile has 64 rows (4 queries at G = 16, 16 at G = 4): a trained model's neighbouring queries
select mostly the same blocks (the forced ones at least), so the union stays well below BLOCK_T * n and every KV
load serves more rows. Neighbours that share little (random selections) would make the wide tile do more masked
work for the same loads, so each wide tile is walked either as one or by its 16-row tiles, whichever its union
sizes favour (_launch_walk: two launches, the choice made on the device).

Backward, dq (and delta): the same query-major walk, recomputing p from the saved lse.
Backward, dk/dv: a scatter from queries to the blocks they chose, done as a gather with no float
atomics. The inverse index (for each (sequence, group, block) the ascending list of the queries that
selected it) is built with a stable torch.sort and sized by a static bound, so nothing is read back to
the host; the lists are cut into work items of at most `chunk`
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
from .utils import (LN2_K, LOG2E, LOG2E_K, MAX_HEAD_DIM, check_backward_extras, dot_precision, load_rows,
                    pow2_at_least, softmax_update)

# Rows (query, head pairs) per program. The query-major kernels (forward, dq) take WALK_ROWS // G consecutive
# queries (at most WALK_QUERIES, at least one) and walk the union of their blocks: 4 queries at G = 16, 16 at G = 4.
# A trained model's neighbouring queries select mostly the same blocks (benchmarks/selection_overlap.py: 4-query
# tiles load 0.31-0.41 of the blocks that one-query tiles load, against 0.61 on random inputs), so each block load
# serves more rows. H200, T = 8k, forward + dq on experiment 1's trained selections: shape P 2.25-2.81 ms against
# 3.58-3.60 on one-query tiles, shape S 1.41-2.15 against 2.33-3.04; on random selections P 4.03 against 3.65
# (slower), S 3.40 against 4.36, and at T = 64k S 19% slower (BENCHMARKS.md, 2026-12-03 night). So the wide tiles
# whose unions are large are walked by TILE_ROWS tiles instead, the choice before (_launch_walk). The kv-major
# kernel gathers queries that all selected its block, so a larger tile wastes nothing there.
TILE_ROWS = 16  # the tl.dot minimum
WALK_ROWS = 64
WALK_QUERIES = 16
KV_TILE_ROWS = 128
# Launch options of the forward, dq and kv-major kernels; KernelOptions.selected_* override them. Forward and dq:
# warps by the tile's padded rows (64 rows: four warps each, forward 1.09-1.37 ms against 1.63-2.06 on two warps on
# the trained selections above; 16 rows, one query at G = 16 (before): one / two warps, forward P 8k 1.71 ms
# against 2.10 on two warps), two stages (three were slower); kv-major on 128-row tiles, eight warps, work items
# of at most 1024 queries (shape P: 8k 1.55 ms against 2.46 at 64 rows / 4 warps / 2048, 64k 13.7 against 15.1;
# shape S: 8k 0.84 against 0.97, 64k 7.3 against 6.7).
WALK_WARPS = {16: (1, 2), 32: (2, 2), 64: (4, 4)}  # padded rows -> (forward, dq) warps; larger tiles take 64's
WALK_STAGES = 2
KV_LAUNCH = dict(num_warps=8, num_stages=2)
KV_ITEM_QUERIES = 1024


def query_tile(G: int, min_rows: int = TILE_ROWS, max_queries: int | None = None) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_M): queries per program (min_rows // G, at most max_queries, at least 1) and padded rows
    (BLOCK_T * G <= BLOCK_M, a power of two)."""
    block_t = max(1, min(min_rows // G, max_queries or min_rows))
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
def _tile_index(TILE_OFF, pid_t, pid_b, TILES, IS_VARLEN: tl.constexpr):
    """Row of tile pid_t of sequence pid_b in a per-tile buffer: TILE_OFF[sequence] + pid_t (packed) or
    pid_b * TILES + pid_t (dense)."""
    if IS_VARLEN:
        return tl.load(TILE_OFF + pid_b).to(tl.int64) + pid_t
    return pid_b.to(tl.int64) * TILES + pid_t


@triton.jit
def _tile_blocks(UNION, TILE_OFF, pid_t, pid_b, g, HKV, TILES, IS_VARLEN: tl.constexpr,
                 U_SLOTS: tl.constexpr, U_PAD: tl.constexpr, exists):
    """(first slot of the tile's union row in UNION [tiles, HKV, U_SLOTS], number of blocks in it).

    The union row holds the distinct blocks the tile's queries selected, ascending, then entries < 0 or
    >= 2^30 (none); its tile index is _tile_index's. exists: whether the tile starts inside its sequence (the rows
    of tiles past it are not read: 0 blocks)."""
    row = (_tile_index(TILE_OFF, pid_t, pid_b, TILES, IS_VARLEN) * HKV + g) * U_SLOTS
    slots = tl.arange(0, U_PAD)
    ids = tl.load(UNION + row + slots, mask=(slots < U_SLOTS) & exists, other=-1)
    return row, tl.sum(((ids >= 0) & (ids < 1073741824)).to(tl.int32), axis=0)


@triton.jit
def _walked_elsewhere(num_blocks, WIDE_WALK, TILE_OFF, TILES, OTHER, OTHER_OFF, OTHER_TILES, pid_t, pid_b, g, HKV,
                      seqlen, IS_VARLEN: tl.constexpr, BLOCK_T: tl.constexpr, OTHER_T: tl.constexpr,
                      OTHER_SLOTS: tl.constexpr, OTHER_PAD: tl.constexpr, DISPATCH: tl.constexpr):
    """Whether the other launch walks the program's tile. DISPATCH 0 (one launch): never. 1 (the wide launch, which
    runs first): the wide tile is walked as one when twice its union (num_blocks) is at most the sum of its narrow
    tiles' unions (OTHER [narrow tiles, HKV, OTHER_SLOTS], OTHER_T queries a tile), else by the narrow launch; the
    choice goes to WIDE_WALK [wide tiles, HKV] (int8, 1: wide). 2 (the narrow launch): reads the choice of the wide
    tile holding its queries (OTHER: the wide tiles, OTHER_T queries each). Every query is walked exactly once."""
    if DISPATCH == 1:
        narrow_blocks = num_blocks * 0
        for j in tl.static_range(BLOCK_T // OTHER_T):
            sub = pid_t * (BLOCK_T // OTHER_T) + j
            _, blocks = _tile_blocks(OTHER, OTHER_OFF, sub, pid_b, g, HKV, OTHER_TILES, IS_VARLEN, OTHER_SLOTS,
                                     OTHER_PAD, sub * OTHER_T < seqlen)
            narrow_blocks += blocks
        elsewhere = 2 * num_blocks > narrow_blocks
        tile = _tile_index(TILE_OFF, pid_t, pid_b, TILES, IS_VARLEN)
        tl.store(WIDE_WALK + tile * HKV + g, tl.where(elsewhere, 0, 1).to(tl.int8))
        return elsewhere
    if DISPATCH == 2:
        wide_tile = _tile_index(OTHER_OFF, pid_t * BLOCK_T // OTHER_T, pid_b, OTHER_TILES, IS_VARLEN)
        return tl.load(WIDE_WALK + wide_tile * HKV + g) != 0
    return num_blocks < 0


@triton.jit
def _selected_rows(BID, bid_row, row_ok, blk, N_SLOTS: tl.constexpr, N_PAD: tl.constexpr, ONE_QUERY: tl.constexpr):
    """Rows whose query selected block blk (all valid rows when the tile is one query: its union is its row)."""
    if ONE_QUERY:
        return row_ok
    slots = tl.arange(0, N_PAD)
    ids = tl.load(BID + bid_row[:, None] + slots[None, :], mask=row_ok[:, None] & (slots < N_SLOTS)[None, :],
                  other=-1)
    return tl.sum((ids == blk).to(tl.int32), axis=1) > 0


@triton.jit
def _block_scores(q, K, tok0, k_row, blk, s0, seqlen, t, sel, qk_scale, DK, HKV_DK,
                  SLC_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, DOT_PREC: tl.constexpr):
    """Scores (log2 domain) of the rows at positions t against keys s0 .. s0 + BLOCK_N of block `blk` of the key
    sequence starting at global token tok0 (seqlen keys), -inf where not visible: row selected the block (sel),
    key inside the block and the sequence, and u <= t.
    Returns (s [M, BLOCK_N], u [BLOCK_N], key_ok [BLOCK_N], k [BLOCK_N, BLOCK_DK])."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_DK)
    u = blk * SLC_BLOCK + s0 + offs_n
    key_ok = (s0 + offs_n < SLC_BLOCK) & (u >= 0) & (u < seqlen)
    k = load_rows(K + tok0 * HKV_DK + k_row, u, key_ok, HKV_DK, offs_d, DK)
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


@triton.jit
def _tile_union_kernel(BID, UNION, TILE_OFF, CU, T, HKV, TILES, N_SLOTS: tl.constexpr, N_PAD: tl.constexpr,
                       BLOCK_T: tl.constexpr, T_PAD: tl.constexpr, NO_BLOCK: tl.constexpr, IS_VARLEN: tl.constexpr):
    """grid as the forward: the distinct blocks the tile's queries chose, ascending, then NO_BLOCK, written to
    the tile's row of UNION [tiles, HKV, T_PAD * N_PAD] (every slot written once: a permutation of the tile's
    sorted ids, the first occurrence of each id in front, repeats after them as NO_BLOCK)."""
    pid_t, pid_b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok0, seqlen, _ = _sequence(CU, pid_b, T, 1, IS_VARLEN)
    if pid_t * BLOCK_T >= seqlen:
        return
    K: tl.constexpr = T_PAD * N_PAD
    r = tl.arange(0, T_PAD)
    t = pid_t * BLOCK_T + r
    slots = tl.arange(0, N_PAD)
    ids = tl.load(BID + ((tok0 + t) * (HKV * N_SLOTS) + g * N_SLOTS)[:, None] + slots[None, :],
                  mask=((r < BLOCK_T) & (t < seqlen))[:, None] & (slots < N_SLOTS)[None, :], other=-1)
    ids = tl.sort(tl.reshape(tl.where(ids >= 0, ids, NO_BLOCK), (K,)))
    i = tl.arange(0, K)
    first = (i == 0) | (ids != tl.gather(ids, tl.maximum(i - 1, 0), 0))
    rank = tl.cumsum(first.to(tl.int32), 0)  # distinct ids up to and including i
    distinct = tl.sum(first.to(tl.int32), 0)
    if IS_VARLEN:
        tile = tl.load(TILE_OFF + pid_b).to(tl.int64) + pid_t
    else:
        tile = pid_b.to(tl.int64) * TILES + pid_t
    dest = tl.where(first, rank - 1, distinct + i - rank)
    tl.store(UNION + (tile * HKV + g) * K + dest, tl.where(first, ids, NO_BLOCK))


# ----------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _selected_fwd_kernel(Q, K, V, BID, UNION, TILE_OFF, WIDE_WALK, OTHER, OTHER_OFF, O, LSE, CU, CU_K, qk_scale, T, Tk,
                HQ, HKV, DK, DV, TILES, OTHER_TILES,
                G: tl.constexpr, N_SLOTS: tl.constexpr, N_PAD: tl.constexpr, U_SLOTS: tl.constexpr,
                U_PAD: tl.constexpr, OTHER_T: tl.constexpr, OTHER_SLOTS: tl.constexpr, OTHER_PAD: tl.constexpr,
                DISPATCH: tl.constexpr, SLC_BLOCK: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, DOT_PREC: tl.constexpr):
    """grid (cdiv(T or max_seqlen, BLOCK_T), B or N sequences, HKV); online softmax over the tile's union of
    blocks, one block per trip of a loop whose trip count is known on entry (so Triton pipelines the loads).
    The queries are the last rows of their key sequence (CU_K, Tk): row t sits at position t + Tk_seq - T_seq."""
    pid_t, pid_b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok0, seqlen, lse0 = _sequence(CU, pid_b, T, HQ, IS_VARLEN)
    ktok0, kseqlen, _ = _sequence(CU_K, pid_b, Tk, 1, IS_VARLEN)
    if pid_t * BLOCK_T >= seqlen:
        return
    union_row, num_blocks = _tile_blocks(UNION, TILE_OFF, pid_t, pid_b, g, HKV, TILES, IS_VARLEN, U_SLOTS, U_PAD,
                                         pid_t * BLOCK_T < seqlen)
    if _walked_elsewhere(num_blocks, WIDE_WALK, TILE_OFF, TILES, OTHER, OTHER_OFF, OTHER_TILES, pid_t, pid_b, g, HKV,
                         seqlen, IS_VARLEN, BLOCK_T, OTHER_T, OTHER_SLOTS, OTHER_PAD, DISPATCH):
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
    for i in range(0, num_blocks):
        blk = tl.load(UNION + union_row + i)
        sel = _selected_rows(BID, bid_row, row_ok, blk, N_SLOTS, N_PAD, BLOCK_T == 1)
        for s0 in tl.static_range(0, SLC_BLOCK, BLOCK_N):
            s, u, key_ok, k = _block_scores(q, K, ktok0, g * DK, blk, s0, kseqlen, t + (kseqlen - seqlen), sel,
                                            qk_scale, DK, HKV * DK, SLC_BLOCK, BLOCK_N, BLOCK_DK, DOT_PREC)
            v = load_rows(V + ktok0 * (HKV * DV) + g * DV, u, key_ok, HKV * DV, offs_dv, DV)
            m_i, l_i, acc = softmax_update(m_i, l_i, acc, s, v, DOT_PREC)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_K, float("-inf"))
    tl.store(O + (tok0 + t)[:, None] * (HQ * DV) + h[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + lse0 + h * T + t, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _selected_dq_kernel(Q, K, V, BID, UNION, TILE_OFF, WIDE_WALK, OTHER, OTHER_OFF, O, DO, LSE, DQ, DELTA, CU, CU_K,
                   qk_scale, scale, T, Tk, HQ, HKV, DK, DV, TILES, OTHER_TILES,
                   G: tl.constexpr, N_SLOTS: tl.constexpr, N_PAD: tl.constexpr, U_SLOTS: tl.constexpr,
                   U_PAD: tl.constexpr, OTHER_T: tl.constexpr, OTHER_SLOTS: tl.constexpr, OTHER_PAD: tl.constexpr,
                   DISPATCH: tl.constexpr, SLC_BLOCK: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DELTA: tl.constexpr,
                   ACCUMULATE: tl.constexpr, DOT_PREC: tl.constexpr):
    """Query-major backward, grid as the forward: dq = scale * sum_u ds k over the union of blocks (ACCUMULATE:
    added to DQ in float32, rounded once). Delta = rowsum(do * o) is read from DELTA [B, HQ, T] (HAS_DELTA) or made
    here and stored there for the kv-major kernel."""
    pid_t, pid_b, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    tok0, seqlen, lse0 = _sequence(CU, pid_b, T, HQ, IS_VARLEN)
    ktok0, kseqlen, _ = _sequence(CU_K, pid_b, Tk, 1, IS_VARLEN)
    if pid_t * BLOCK_T >= seqlen:
        return
    union_row, num_blocks = _tile_blocks(UNION, TILE_OFF, pid_t, pid_b, g, HKV, TILES, IS_VARLEN, U_SLOTS, U_PAD,
                                         pid_t * BLOCK_T < seqlen)
    if _walked_elsewhere(num_blocks, WIDE_WALK, TILE_OFF, TILES, OTHER, OTHER_OFF, OTHER_TILES, pid_t, pid_b, g, HKV,
                         seqlen, IS_VARLEN, BLOCK_T, OTHER_T, OTHER_SLOTS, OTHER_PAD, DISPATCH):
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
    if HAS_DELTA:
        delta = tl.load(DELTA + lse0 + h * T + t, mask=row_ok, other=0.0)
    else:
        delta = tl.sum(do.to(tl.float32) * tl.load(O + o_off, mask=dv_mask, other=0.0).to(tl.float32), axis=1)
        tl.store(DELTA + lse0 + h * T + t, delta, mask=row_ok)
    lse = tl.load(LSE + lse0 + h * T + t, mask=row_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E_K  # empty rows: p = 0 below anyway
    bid_row = (tok0 + t) * (HKV * N_SLOTS) + g * N_SLOTS

    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    for i in range(0, num_blocks):
        blk = tl.load(UNION + union_row + i)
        sel = _selected_rows(BID, bid_row, row_ok, blk, N_SLOTS, N_PAD, BLOCK_T == 1)
        for s0 in tl.static_range(0, SLC_BLOCK, BLOCK_N):
            s, u, key_ok, k = _block_scores(q, K, ktok0, g * DK, blk, s0, kseqlen, t + (kseqlen - seqlen), sel,
                                            qk_scale, DK, HKV * DK, SLC_BLOCK, BLOCK_N, BLOCK_DK, DOT_PREC)
            v = load_rows(V + ktok0 * (HKV * DV) + g * DV, u, key_ok, HKV * DV, offs_dv, DV)
            p = tl.where(s > float("-inf"), tl.exp2(s - lse2[:, None]), 0.0)  # [M, N]
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * scale
    if ACCUMULATE:
        dq += tl.load(DQ + q_off, mask=dk_mask, other=0.0).to(tl.float32)
    tl.store(DQ + q_off, dq.to(DQ.dtype.element_ty), mask=dk_mask)


@triton.jit
def _selected_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QLIST, ITEM_KEY, ITEM_LO, ITEM_HI, PDK, PDV, CU, CU_K,
                   qk_scale, scale, T, Tk, HQ, HKV, DK, DV, NUM_BLOCKS,
                   G: tl.constexpr, SLC_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """kv-major backward, grid (work items,). Item i covers the queries
    QLIST[ITEM_LO[i] : ITEM_HI[i]] (global token ids, ascending) that selected block
    key = (sequence * HKV + g) * NUM_BLOCKS + j; it writes the item's partial dk/dv of that block
    (BLOCK_S >= SLC_BLOCK rows) to PDK [items, BLOCK_S, BLOCK_DK] / PDV [items, BLOCK_S, BLOCK_DV]."""
    item = tl.program_id(0).to(tl.int64)
    lo = tl.load(ITEM_LO + item)
    hi = tl.load(ITEM_HI + item)
    if lo >= hi:  # the grid is an upper bound on the items (its size needs no host sync); the rest are empty
        return
    key = tl.load(ITEM_KEY + item)
    j = key % NUM_BLOCKS
    g = (key // NUM_BLOCKS) % HKV
    tok0, seqlen, lse0 = _sequence(CU, key // (NUM_BLOCKS * HKV), T, HQ, IS_VARLEN)
    ktok0, kseqlen, _ = _sequence(CU_K, key // (NUM_BLOCKS * HKV), Tk, 1, IS_VARLEN)
    offset = kseqlen - seqlen  # query row t sits at position t + offset
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    u = j * SLC_BLOCK + offs_s
    key_ok = (offs_s < SLC_BLOCK) & (u < kseqlen)
    k = tl.load(K + (ktok0 + u)[:, None] * (HKV * DK) + g * DK + offs_dk[None, :],
                mask=key_ok[:, None] & (offs_dk[None, :] < DK), other=0.0)
    v = tl.load(V + (ktok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :],
                mask=key_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    r = tl.arange(0, BLOCK_M)  # row r: query QLIST[i0 + r // G], head g * G + r % G
    h = g * G + r % G
    for i0 in range(lo, hi, BLOCK_Q):
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
        visible = row_ok[:, None] & key_ok[None, :] & (u[None, :] <= t[:, None] + offset)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)  # [M, S]
        ds = p * (tl.dot(do, tl.trans(v), input_precision=DOT_PREC) - delta[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    tl.store(PDK + item * (BLOCK_S * BLOCK_DK) + offs_s[:, None] * BLOCK_DK + offs_dk[None, :], dk * scale)
    tl.store(PDV + item * (BLOCK_S * BLOCK_DV) + offs_s[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def _selected_dkdv_reduce_kernel(PDK, PDV, KEY_ITEMS, DKO, DVO, CU_K, Tk, HKV, DK, DV, NUM_BLOCKS,
                          SLC_BLOCK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DK: tl.constexpr,
                          BLOCK_DV: tl.constexpr, IS_VARLEN: tl.constexpr):
    """grid (sequences * HKV * NUM_BLOCKS,): dk/dv of block `key` = sum of its items' partials
    KEY_ITEMS[key] .. KEY_ITEMS[key + 1] - 1 in increasing order (zero when nobody selected it)."""
    key = tl.program_id(0)
    j = key % NUM_BLOCKS
    g = (key // NUM_BLOCKS) % HKV
    tok0, seqlen, _ = _sequence(CU_K, key // (NUM_BLOCKS * HKV), Tk, 1, IS_VARLEN)
    if j * SLC_BLOCK >= seqlen:
        return
    offs_s = tl.arange(0, BLOCK_S)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    first = tl.load(KEY_ITEMS + key).to(tl.int64)
    for i in range(0, tl.load(KEY_ITEMS + key + 1) - tl.load(KEY_ITEMS + key)):
        dk += tl.load(PDK + (first + i) * (BLOCK_S * BLOCK_DK) + offs_s[:, None] * BLOCK_DK + offs_dk[None, :])
        dv += tl.load(PDV + (first + i) * (BLOCK_S * BLOCK_DV) + offs_s[:, None] * BLOCK_DV + offs_dv[None, :])
    u = j * SLC_BLOCK + offs_s
    key_ok = (offs_s < SLC_BLOCK) & (u < seqlen)
    tl.store(DKO + (tok0 + u)[:, None] * (HKV * DK) + g * DK + offs_dk[None, :], dk.to(DKO.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dk[None, :] < DK))
    tl.store(DVO + (tok0 + u)[:, None] * (HKV * DV) + g * DV + offs_dv[None, :], dv.to(DVO.dtype.element_ty),
             mask=key_ok[:, None] & (offs_dv[None, :] < DV))


# ----------------------------------------------------------------------------------------------
# Host wrappers


def _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen):
    """(grid batch extent, T, max query rows of one sequence)."""
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
    """The walk kernels' constexprs other than the tile's (BLOCK_T, BLOCK_M: _walk_tile)."""
    return dict(G=G, N_SLOTS=n, N_PAD=triton.next_power_of_2(n), SLC_BLOCK=block_size, BLOCK_DK=pow2_at_least(DK),
                BLOCK_DV=pow2_at_least(DV), DOT_PREC=dot_precision(dtype))


def _walk_tile(launch, block_size: int, G: int, kernel: int, rows: int, max_queries: int | None) -> tuple:
    """(meta fields BLOCK_T and BLOCK_M, launch keywords) of a forward (kernel 0) or dq (kernel 1) tile of `rows`
    rows (query_tile), BLOCK_N keys per step (up to 64 of a block), warps (WALK_WARPS by the padded rows unless
    launch.num_warps), stages."""
    block_t, block_m = query_tile(G, rows, max_queries)
    warps = WALK_WARPS[min(block_m, max(WALK_WARPS))][kernel]
    kw = launch.over(dict(ROWS=rows, BLOCK_N=min(pow2_at_least(block_size), 64), num_warps=warps,
                          num_stages=WALK_STAGES), block_m="ROWS", block_n="BLOCK_N")
    del kw["ROWS"]
    return dict(BLOCK_T=block_t, BLOCK_M=block_m), kw


def _walk_tiles(launch, block_size: int, G: int, kernel: int) -> list[tuple]:
    """The tiles of the forward (kernel 0) or dq (kernel 1) walk, as _walk_tile's pairs: the one launch.block_m asks
    for; else WALK_ROWS rows of at most WALK_QUERIES queries and, when that is more queries than a TILE_ROWS tile
    holds, also the TILE_ROWS tile (the choice before 2026-12-03), which walks the wide tiles whose queries share
    too few blocks (_launch_walk)."""
    if launch.block_m:
        return [_walk_tile(launch, block_size, G, kernel, launch.block_m, None)]
    wide = _walk_tile(launch, block_size, G, kernel, WALK_ROWS, WALK_QUERIES)
    narrow = _walk_tile(launch, block_size, G, kernel, TILE_ROWS, None)
    wide_t, narrow_t = wide[0]["BLOCK_T"], narrow[0]["BLOCK_T"]
    if wide_t == narrow_t:
        return [wide]
    return [wide, narrow] if wide_t % narrow_t == 0 else [narrow]  # a narrow tile must not straddle two wide ones


_NO_BLOCK = 2 ** 30  # sorts after every block id


def _tile_unions(block_ids, meta, cu_seqlens, grid):
    """The blocks each tile of BLOCK_T consecutive queries of a sequence walks: their union, on the device.

    block_ids int32 [B, T, Hkv, n] -> (union int32 [tiles, Hkv, U], tile_off int32 [N] or None): union row
    (tile, g) holds the distinct ids the tile's queries chose, ascending, then _NO_BLOCK; tile k of sequence s
    is row tile_off[s] + k (packed) or s * cdiv(T, BLOCK_T) + k (dense). One query per tile (G >= 16): the rows
    of block_ids are already that (ascending, then -1), so they serve as the union as they are.
    """
    B, T, Hkv, n = block_ids.shape
    block_t = meta["BLOCK_T"]
    if block_t == 1:
        return block_ids.reshape(B * T, Hkv, n), (None if cu_seqlens is None else cu_seqlens[:-1])
    tile_off = None
    tiles = B * triton.cdiv(T, block_t)
    if cu_seqlens is not None:
        tiles_of_seq = (cu_seqlens[1:] - cu_seqlens[:-1] + block_t - 1) // block_t
        tile_off = (torch.cumsum(tiles_of_seq, 0) - tiles_of_seq).to(torch.int32)
        tiles = T // block_t + tiles_of_seq.numel()  # a bound on sum(tiles_of_seq): static, no host read
    t_pad = triton.next_power_of_2(block_t)
    union = torch.empty(tiles, Hkv, t_pad * meta["N_PAD"], dtype=torch.int32, device=block_ids.device)
    _tile_union_kernel[grid](block_ids, union, tile_off, cu_seqlens, T, Hkv, triton.cdiv(T, block_t),
                             N_SLOTS=n, N_PAD=meta["N_PAD"], BLOCK_T=block_t, T_PAD=t_pad, NO_BLOCK=_NO_BLOCK,
                             IS_VARLEN=cu_seqlens is not None)
    return union, tile_off


def _launch_walk(kernel, extent, block_ids, cu_seqlens, cu_seqlens_k, meta, tiles, tensors, scalars):
    """Launches the forward or dq kernel (tensors: Q, K, V, BID, then the kernel's outputs and extra inputs) over
    its tiles' block unions. extent: (max query rows of a sequence, grid batch extent, HKV); tiles: _walk_tiles.

    Two tiles (wide, then narrow): a wide tile is walked as one when its union holds at most half the blocks that
    its narrow tiles' unions hold together, else by the narrow tiles. On an H200 at T = 8k a 64-row step cost about
    twice a 16-row one (shape P: 4-query tiles paid below about 31 union blocks of a possible 64), so the choice
    follows the loads: a trained model's neighbours mostly share enough, random selections mostly do not (at G = 4,
    T = 64k, 16-query tiles were 19% slower than 4-query ones on them). Both launches decide on the device, the wide
    one first (it records each choice for the narrow one): no host sync.
    """
    max_len, nb, HKV = extent
    T = block_ids.shape[1]
    walks = []
    for tile, launch in tiles:
        tile_meta = dict(meta, **tile)
        grid = (triton.cdiv(max_len, tile["BLOCK_T"]), nb, HKV)
        union, tile_off = _tile_unions(block_ids, tile_meta, cu_seqlens, grid)
        walks.append((grid, tile_meta, launch, union, tile_off, triton.cdiv(T, tile["BLOCK_T"])))
    wide_walk = None
    if len(walks) == 2:
        wide_walk = torch.empty(walks[0][3].shape[0], HKV, dtype=torch.int8, device=block_ids.device)
    for i, (grid, tile_meta, launch, union, tile_off, tiles_of_seq) in enumerate(walks):
        _, other_meta, _, other, other_off, other_tiles = walks[len(walks) - 1 - i]  # the other launch's (or its own)
        kernel[grid](*tensors[:4], union, tile_off, wide_walk, other, other_off, *tensors[4:], cu_seqlens, cu_seqlens_k,
                     *scalars, tiles_of_seq, other_tiles, U_SLOTS=union.shape[-1],
                     U_PAD=triton.next_power_of_2(union.shape[-1]), OTHER_T=other_meta["BLOCK_T"],
                     OTHER_SLOTS=other.shape[-1], OTHER_PAD=triton.next_power_of_2(other.shape[-1]),
                     DISPATCH=0 if wide_walk is None else i + 1, IS_VARLEN=cu_seqlens is not None, **tile_meta,
                     **launch)


def _key_layout(k, cu_seqlens, max_len, cu_seqlens_k, max_seqlen_k) -> tuple:
    """(cu_seqlens_k, max key rows of one sequence) of the keys, which may be longer than the queries (suffix
    queries: each sequence's queries are the last rows of its keys)."""
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("cu_seqlens_k needs cu_seqlens (the queries' offsets) beside it")
        return None, k.shape[1]
    if cu_seqlens_k is None:
        return cu_seqlens, max_len
    if max_seqlen_k is None:
        max_seqlen_k = int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    return cu_seqlens_k, max_seqlen_k


def selected_attention_fwd(q, k, v, block_ids, scale, block_size, *, cu_seqlens=None, max_seqlen=None,
                           cu_seqlens_k=None, max_seqlen_k=None, options: KernelOptions = KernelOptions()):
    """q [B, T, Hq, Dk], k [B, Tk, Hkv, Dk], v [B, Tk, Hkv, Dv], block_ids int32 [B, T, Hkv, n]
    (ascending, -1 trailing) -> o [B, T, Hq, Dv] (q's dtype), lse [B, Hq, T] float32 (natural log).
    Packed sequences: B = 1, cu_seqlens int32 [N + 1]; block ids and positions are per sequence.
    Suffix queries (Tk >= T; packed: cu_seqlens_k int32 [N + 1] of the keys, max_seqlen_k their longest): each
    sequence's queries are the last rows of its keys."""
    q, k, v, block_ids = (x.contiguous() for x in (q, k, v, block_ids.to(torch.int32)))
    nb, T, max_len = _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen)
    cu_seqlens_k, _ = _key_layout(k, cu_seqlens, max_len, cu_seqlens_k, max_seqlen_k)
    B, _, HQ, DK = q.shape
    HKV, DV = k.shape[2], v.shape[3]
    meta = _meta(HQ // HKV, DK, DV, block_size, block_ids.shape[3], q.dtype)
    o = torch.empty(B, T, HQ, DV, device=q.device, dtype=q.dtype)  # every row is written (zeros where empty)
    lse = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32)
    if T:
        _launch_walk(_selected_fwd_kernel, (max_len, nb, HKV), block_ids, cu_seqlens, cu_seqlens_k, meta,
                     _walk_tiles(options.selected_fwd, block_size, HQ // HKV, 0), (q, k, v, block_ids, o, lse),
                     (scale * LOG2E, T, k.shape[1], HQ, HKV, DK, DV))
    return o, lse


def _queries_by_key(block_ids, cu_seqlens, T, num_blocks):
    """(qlist int32 [B*T*Hkv*n], bounds int64 [keys + 1]): for every key (sequence, group, block j), numbered
    (sequence * Hkv + group) * num_blocks + j, the ascending token ids of the queries that selected it are
    qlist[bounds[key]:bounds[key + 1]] (then the unused slots). A stable sort of int32 keys in (token, group, slot)
    order, so tokens stay ascending inside every key; no host sync."""
    B, _, HKV, n = block_ids.shape
    dev = block_ids.device
    nseq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    num_keys = nseq * HKV * num_blocks
    if num_keys >= 2 ** 31 - 1:
        raise ValueError(f"too many (sequence, KV head, block) keys for int32: {num_keys}")
    ids = block_ids.reshape(-1, T, HKV, n) if cu_seqlens is None else block_ids.reshape(T, HKV, n)
    if cu_seqlens is None:  # key of (b, t, g, slot) = (b * Hkv + g) * num_blocks + id
        first_key = (torch.arange(B * HKV, device=dev, dtype=torch.int32) * num_blocks).view(B, 1, HKV, 1)
    else:
        seq = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=dev, dtype=cu_seqlens.dtype), right=True)
        g = torch.arange(HKV, device=dev, dtype=torch.int32)
        first_key = ((seq.to(torch.int32)[:, None] * HKV + g) * num_blocks)[:, :, None]
    keys = torch.where((ids >= 0) & (ids < num_blocks), first_key + ids, num_keys)  # unused slots sort last
    sorted_keys, order = torch.sort(keys.flatten(), stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, device=dev, dtype=torch.int32))
    return (order // (HKV * n)).to(torch.int32), bounds


def _work_items(bounds, chunk, max_items):
    """The keys' query lists cut into work items of at most `chunk` queries: (ITEM_KEY, ITEM_LO, ITEM_HI) int32
    [max_items] (item i covers qlist[ITEM_LO[i]:ITEM_HI[i]] of key ITEM_KEY[i]; items past the real count are
    empty) and KEY_ITEMS int32 [keys + 1], the first item of each key. max_items: a static bound on the count."""
    num_keys = bounds.numel() - 1
    items_per_key = (bounds.diff() + chunk - 1) // chunk
    key_items = torch.nn.functional.pad(torch.cumsum(items_per_key, 0), (1, 0))
    item = torch.arange(max_items, device=bounds.device)
    item_key = torch.searchsorted(key_items[1:], item, right=True).clamp_(max=num_keys - 1)
    lo = bounds[item_key] + (item - key_items[item_key]) * chunk
    hi = torch.minimum(lo + chunk, bounds[item_key + 1])
    lo = torch.where(item < key_items[-1], lo, hi)  # past the real items: empty
    i32 = torch.int32
    return item_key.to(i32), lo.to(i32), hi.to(i32), key_items.to(i32)


def _inverse_index(block_ids, cu_seqlens, T, num_blocks, chunk):
    """For every key (sequence, group, block j) the ascending global token ids of the queries that selected
    it (QLIST), cut into work items of at most `chunk` queries. Returns (QLIST, ITEM_KEY, ITEM_LO, ITEM_HI,
    KEY_ITEMS) with KEY_ITEMS [keys + 1] the first item of each key. Deterministic torch ops, no host sync:
    the item arrays have a static length, a bound on the real count (items past it have ITEM_LO == ITEM_HI)."""
    qlist, bounds = _queries_by_key(block_ids, cu_seqlens, T, num_blocks)
    max_items = bounds.numel() - 1 + qlist.numel() // chunk  # sum over keys of ceil(count / chunk)
    return (qlist, *_work_items(bounds, chunk, max_items))


def selected_attention_bwd(do, q, k, v, o, lse, block_ids, scale, block_size, *, cu_seqlens=None, max_seqlen=None,
                           cu_seqlens_k=None, max_seqlen_k=None, chunk=None, delta=None, add_dq_to=None,
                           dq_after=None, options: KernelOptions = KernelOptions()):
    """Gradients of selected_attention_fwd: (dq, dk, dv) in the dtypes of q, k, v, bitwise reproducible.

    dq query-major, dk/dv kv-major over the inverse index, no float atomics, no host sync.
    chunk: queries per kv-major work item (default KV_ITEM_QUERIES). delta, add_dq_to: as in
    banded.banded_attention_bwd (rowsum(do * o) when the caller has it; dq added in place). Given delta, dk/dv are
    launched before dq (without it the dq kernel makes delta, which dk/dv read, so dq goes first); dq_after (a
    torch.cuda.Event) makes the dq launch wait for it, when add_dq_to is written on another stream."""
    q, k, v, o, do, block_ids = (x.contiguous() for x in (q, k, v, o, do, block_ids.to(torch.int32)))
    lse = lse.contiguous()
    check_backward_extras(q, delta, add_dq_to)
    nb, T, max_len = _launch_shape(q, k, v, block_ids, cu_seqlens, max_seqlen)
    cu_seqlens_k, max_len_k = _key_layout(k, cu_seqlens, max_len, cu_seqlens_k, max_seqlen_k)
    B, _, HQ, DK = q.shape
    Tk, HKV, DV = k.shape[1], k.shape[2], v.shape[3]
    G = HQ // HKV
    meta = _meta(G, DK, DV, block_size, block_ids.shape[3], q.dtype)
    varlen = cu_seqlens is not None
    dq = torch.empty_like(q) if add_dq_to is None else add_dq_to
    dk = torch.empty_like(k)  # the reduction writes every token of every sequence
    dv = torch.empty_like(v)
    if T == 0:
        return dq, dk.zero_(), dv.zero_()
    qk_scale = scale * LOG2E
    has_delta = delta is not None
    delta = torch.empty(B, HQ, T, device=q.device, dtype=torch.float32) if delta is None else delta.contiguous()

    def walk_dq():
        if dq_after is not None:
            torch.cuda.current_stream(q.device).wait_event(dq_after)
        _launch_walk(_selected_dq_kernel, (max_len, nb, HKV), block_ids, cu_seqlens, cu_seqlens_k,
                     dict(meta, HAS_DELTA=has_delta, ACCUMULATE=add_dq_to is not None),
                     _walk_tiles(options.selected_dq, block_size, G, 1), (q, k, v, block_ids, o, do, lse, dq, delta),
                     (qk_scale, scale, T, Tk, HQ, HKV, DK, DV))

    if not has_delta:
        walk_dq()
    num_blocks = triton.cdiv(max_len_k, block_size)
    chunk = KV_ITEM_QUERIES if chunk is None else chunk
    qlist, item_key, lo, hi, key_items = _inverse_index(block_ids, cu_seqlens, T, num_blocks, chunk)
    block_s, block_dk, block_dv = pow2_at_least(block_size), meta["BLOCK_DK"], meta["BLOCK_DV"]
    num_items = item_key.numel()
    pdk = torch.empty(num_items, block_s, block_dk, device=q.device, dtype=torch.float32)
    pdv = torch.empty(num_items, block_s, block_dv, device=q.device, dtype=torch.float32)
    kv = options.selected_dkdv.over(dict(BLOCK_M=KV_TILE_ROWS, **KV_LAUNCH), block_m="BLOCK_M")
    block_q, block_m = query_tile(G, kv.pop("BLOCK_M"))
    _selected_dkdv_kernel[(num_items,)](q, k, v, do, lse, delta, qlist, item_key, lo, hi, pdk, pdv, cu_seqlens,
                                 cu_seqlens_k, qk_scale, scale, T, Tk, HQ, HKV, DK, DV, num_blocks, G=G,
                                 SLC_BLOCK=block_size, BLOCK_S=block_s, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_DK=block_dk,
                                 BLOCK_DV=block_dv, IS_VARLEN=varlen, DOT_PREC=meta["DOT_PREC"], **kv)
    _selected_dkdv_reduce_kernel[(nb * HKV * num_blocks,)](pdk, pdv, key_items, dk, dv, cu_seqlens_k, Tk, HKV, DK, DV,
                                                    num_blocks, SLC_BLOCK=block_size, BLOCK_S=block_s,
                                                    BLOCK_DK=block_dk, BLOCK_DV=block_dv, IS_VARLEN=varlen)
    del pdk, pdv  # back to the allocator (stream-ordered) before the dq walk
    if has_delta:
        walk_dq()
    return dq, dk, dv
