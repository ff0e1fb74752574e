"""NSA decoding step in Triton: the S newest tokens of each batch row attend through a KV cache.

Same math as nsa_attention (SPEC.md) at positions t = L - S .. L - 1 of a row holding L = cache_seqlens[b]
raw tokens. Built for q_len = 1 (S = 1) and a few tokens for speculative decoding.

Work layout. Every kernel works on the G * S rows (query, head) of one GQA group, row r = s * G + i
being query s and head h = g * G + i (padded to >= 16 rows for tl.dot, tiled by BLOCK_R rows when
G * S is large). Long key ranges are split over several programs (flash-decoding): each program
writes a partial softmax state (m, l, acc) in float32, m in log2 units,
    m = max_u s_u,   l = sum_u 2^(s_u - m),   acc = sum_u 2^(s_u - m) v_u,
and a combine merges the splits: o = sum_p 2^(m_p - M) acc_p / sum_p 2^(m_p - M) l_p, M = max_p m_p.

Launches (4, every grid and buffer shape static: they depend on B, S, heads, capacities and the config,
never on cache_seqlens, so a step can be captured in a CUDA graph; nothing is read back to the host):
  1. _cmp_kernel     grid (CMP_SPLITS * row tiles, Hkv, B)
       compressed attention over the row's Tc(L) compressed tokens, split over tiles of BLOCK_C tokens
       -> partial (m, l, acc) of o_cmp; and, for the selection, each tile's p_cmp pooled onto the
       selection blocks it covers: pooled[r, j] = sum_i d * W[i, j] * 2^(s_ri - mt_r) with mt_r the
       tile's row max (stored beside), W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.
       A tile owns NBJ whole selection blocks and also reads the H = l/d - 1 compressed tokens before
       them (they overlap its first block), so every block score has a single writer and no carry.
  2. _block_score_kernel  grid (CHUNKS * S, Hkv, B)
       lse_cmp of each head (merging the splits' (m, l)), the group score of each block of a chunk of
       CHUNK blocks, P[j] ~ sum_h pooled[h, j] * 2^(mt_h - lse_h) (up to the constant 1/d), the forced
       blocks J(t), J(t) - 1, 0 scored above everything -> the chunk's top n as sortable int64 keys.
       (A top n per chunk, then of the chunks' CHUNKS * n winners, because n rounds of argmax over every
       block of a long context in one program per group were the step's slowest part: 25 us at 64k.)
  3. _sparse_kernel  grid ((SLC_SPLITS + SWA_SPLITS) * row tiles, Hkv, B)
       the first SLC_SPLITS programs each take the top n of the chunks' winners (block ids, also returned
       as [B, Hkv, S, n] int32, ascending then -1) and share the S * n selected blocks (each distinct block
       loaded once for all rows, masked per row by its query's selection and u <= t, in tiles of BLOCK_L
       tokens); the others share the window tiles covering [L - S - w + 1, L) -> partial (m, l, acc) of o_slc
       and o_swa.
  4. _combine_kernel grid (G * S rows * column tiles, Hkv, B)
       merges the splits of each branch (SPLIT_CHUNK splits per load) and gates them:
       o = g0 * o_cmp + g1 * o_slc + g2 * o_swa.

Bytes read per step, per batch row and KV head (2-byte dtype, D = Dk + Dv): the compressed cache once,
2 * D * Tc(L) (plus l/d - 1 halo keys per BLOCK_C), the distinct selected blocks, at most 2 * D * n * l'
per query, and the window, 2 * D * (w + S - 1); then float32 scratch: pooled scores 2 x 4 * G * S * L / l'
and partials 2 x 4 * G * S * Dv * splits. q, gates and o are negligible.

Programs whose share of the keys lies past their row's length loop zero times and store an empty
state (m = -inf, l = 0), which the merges ignore; cache slots past cache_seqlens[b] are never read.

Untrusted lengths. Every kernel reads L through _row_length, which keeps it only when the row is in range
(S <= L <= capacity and Tc(L) <= capacity_cmp, the capacities being the buffers' own) and else uses L = 0: a
row that attends to nothing. All loop bounds, loads and scratch slots derive from that L, and the scratch is
sized from the capacities, so no value of cache_seqlens makes a kernel touch memory outside its buffers. The
combine writes NaN for such a row and sets error_flag[0] = 1 (a plain store: every writer writes 1).

Non-finite inputs propagate as in the reference: a NaN score (NaN in q, NaN or inf in a visible key) makes l
and acc NaN, and every test on l is `l != 0` (true for NaN), never `l > 0`, so no merge drops it. tl.max may
skip NaN on the GPU (and keep it in the interpreter); either way the NaN reaches l = sum p, acc = p v.
Extra memory: the partials, O(B * Hq * S * splits * Dv) float32, the pooled scores,
O(B * Hq * S * capacity / l') float32, and the chunks' winners, B * Hkv * S * CHUNKS * n int64.
Inference only: no autograd (inputs that require grad under grad mode are rejected).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ...config import NSAConfig
from ..types import KernelOptions
from .utils import (LOG2E, block_ids, block_keys, check_backend_inputs, check_pooling, dot_precision, interpreting,
                    keys_upto, load_rows, pool_probs, pow2_at_least, row_offsets, top_keys, visible)


# ----------------------------------------------------------------------------------------------
# Shared jit helpers


@triton.jit
def _let_next_launch_start(PDL: tl.constexpr):
    """Programmatic dependent launch: the step's next kernel may start its programs (they wait in
    _wait_for_previous_launch), so its launch latency and prologue hide behind this kernel."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _wait_for_previous_launch(PDL: tl.constexpr):
    """Blocks until the step's previous kernel has finished and its writes are visible (no-op without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def _group_rows(r0, g, S, G, ROWS, L, BLOCK_R: tl.constexpr):
    """Rows r0 .. r0 + BLOCK_R of a group: (r, query index s, head h, position t = L - S + s, row_ok)."""
    r = r0 + tl.arange(0, BLOCK_R)
    s = r // G
    return r, s, g * G + r % G, L - S + s, r < ROWS


@triton.jit
def _row_length(CACHE_SEQLENS, b, S, CAPACITY, CMP_CAPACITY, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr):
    """(L, ok) of batch row b: L = cache_seqlens[b] when S <= L <= CAPACITY and Tc(L) <= CMP_CAPACITY (ok), else
    L = 0 (a row with no keys: every bound derived from it stays inside the buffers) and ok False."""
    n = tl.load(CACHE_SEQLENS + b)
    in_range = (n >= S) & (n <= CAPACITY)
    n = tl.where(in_range, n, 0)  # before Tc(n): n - 1 must not wrap around at -2^31
    ok = in_range & (keys_upto(n - 1, CMP_STRIDE, CMP_BLOCK) <= CMP_CAPACITY)
    return tl.where(ok, n, 0), ok


@triton.jit
def _tile_probs(s, mask):
    """p = 2^(s - mt) on mask (0 elsewhere) and the row max mt over mask (-inf for an empty row)."""
    s = tl.where(mask, s, float("-inf"))
    mt = tl.max(s, 1)
    p = tl.exp2(s - tl.where(mt == float("-inf"), 0.0, mt)[:, None])
    return p, mt


@triton.jit
def _accumulate(m_i, l_i, acc, p, mt, v, PRECISION: tl.constexpr):
    """Online softmax: adds a tile with probabilities p relative to its row max mt to (m_i, l_i, acc)."""
    m_new = tl.maximum(m_i, mt)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet stay empty, not NaN
    alpha = tl.exp2(m_i - m_ref)
    beta = tl.exp2(mt - m_ref)
    l_i = l_i * alpha + beta * tl.sum(p, 1)
    acc = acc * alpha[:, None] + beta[:, None] * tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend(m_i, l_i, acc, q, K, V, stride_kt, stride_vt, u, key_ok, mask, qk_scale,
            DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
            PRECISION: tl.constexpr):
    """Adds keys u (loaded where key_ok; row r sees key u where mask[r, u]) to the softmax state."""
    k = load_rows(K, u, key_ok, stride_kt, tl.arange(0, BLOCK_DK), DK)
    v = load_rows(V, u, key_ok, stride_vt, tl.arange(0, BLOCK_DV), DV)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2(e) * scale * q.k
    p, mt = _tile_probs(s, mask)
    return _accumulate(m_i, l_i, acc, p, mt, v, PRECISION)


@triton.jit
def _store_partial(M, L, ACC, split, base, r, row_ok, m_i, l_i, acc, ROWS, SPLITS_TOTAL,
                   DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Partial state of split `split`: M, L [B, Hkv, SPLITS_TOTAL, ROWS], ACC [..., ROWS, DV] (acc only if l != 0:
    an empty split skips it; a NaN l keeps it)."""
    idx = (base * SPLITS_TOTAL + split) * ROWS + r
    tl.store(M + idx, m_i, mask=row_ok)
    tl.store(L + idx, l_i, mask=row_ok)
    cols = tl.arange(0, BLOCK_DV)
    tl.store(ACC + idx[:, None] * DV + cols[None, :], acc, mask=(row_ok & (l_i != 0))[:, None] & (cols < DV)[None, :])


@triton.jit
def _merge_lse(M, L, base, lo, hi, r, row_ok, ROWS, SPLITS_TOTAL, SPLIT_CHUNK: tl.constexpr):
    """lse (log2 units) of rows r over splits [lo, hi): sum_p 2^m_p l_p, online over [SPLIT_CHUNK, rows] tiles."""
    chunk = tl.arange(0, SPLIT_CHUNK)
    m_run = tl.full(r.shape, float("-inf"), tl.float32)
    l_run = tl.zeros(r.shape, tl.float32)
    for c in range(lo, hi, SPLIT_CHUNK):
        idx = (base * SPLITS_TOTAL + c + chunk)[:, None] * ROWS + r[None, :]
        ok = (c + chunk < hi)[:, None] & row_ok[None, :]
        m = tl.load(M + idx, mask=ok, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_part = tl.load(L + idx, mask=ok, other=0.0)
        l_run = l_run * tl.exp2(m_run - m_ref) + tl.sum(tl.exp2(m - m_ref[None, :]) * l_part, 0)
        m_run = m_new
    return tl.where(m_run == float("-inf"), 0.0, m_run) + tl.log2(l_run)


@triton.jit
def _merge_row(M, L, ACC, base, lo, hi, r, cols, ROWS, SPLITS_TOTAL, DV: tl.constexpr, SPLIT_CHUNK: tl.constexpr):
    """Columns cols of o (row r) merged over splits [lo, hi), online over [SPLIT_CHUNK, len(cols)] tiles
    (one trip when SPLIT_CHUNK covers every split); zeros if no split saw a key."""
    chunk = tl.arange(0, SPLIT_CHUNK)
    m_run = tl.full([1], float("-inf"), tl.float32)
    l_run = tl.zeros([1], tl.float32)
    acc = tl.zeros(cols.shape, tl.float32)
    for c in range(lo, hi, SPLIT_CHUNK):
        idx = (base * SPLITS_TOTAL + c + chunk) * ROWS + r
        ok = c + chunk < hi
        m = tl.load(M + idx, mask=ok, other=float("-inf"))
        l_part = tl.load(L + idx, mask=ok, other=0.0)
        part = tl.load(ACC + idx[:, None] * DV + cols[None, :], mask=ok[:, None] & (cols < DV)[None, :], other=0.0)
        # acc was stored only where l != 0 (_store_partial): a split can see keys (finite m) and still have
        # l = 0, a compressed tile whose only visible token is its halo; its slot holds stale memory.
        part = tl.where((l_part != 0)[:, None], part, 0.0)
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha, w = tl.exp2(m_run - m_ref), tl.exp2(m - m_ref)
        l_run = l_run * alpha + tl.sum(w * l_part, 0)
        acc = acc * alpha + tl.sum(w[:, None] * part, 0)
        m_run = m_new
    return acc / tl.where(l_run > 0, l_run, 1.0)


# ----------------------------------------------------------------------------------------------
# 1. Compressed attention + pooled block scores


@triton.jit
def _pool_weights(CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                  HALO: tl.constexpr, NBJ: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):
    """d * W[i, j] for the a-th token of a tile and its b-th block: [BLOCK_C, BLOCK_J], zero for b >= NBJ.

    A tile's tokens start HALO tokens before its first block, so token a starts at raw offset (a - HALO) * d
    from that block's start; the tile is the same for every tile. The overlaps are integers: exact in any
    dot precision.
    """
    start = (tl.arange(0, BLOCK_C)[:, None] - HALO) * CMP_STRIDE
    block = tl.arange(0, BLOCK_J)[None, :]
    overlap = tl.minimum(start + CMP_BLOCK, (block + 1) * SLC_BLOCK) - tl.maximum(start, block * SLC_BLOCK)
    return tl.where(block < NBJ, tl.maximum(overlap, 0), 0).to(tl.float32)


@triton.jit
def _cmp_kernel(Q, KC, VC, CACHE_SEQLENS, M, L, ACC, POOL, TMAX,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                S, G, Hkv, ROWS, SPLITS_TOTAL, NB_CAP, TILES_CAP, CAPACITY, CMP_CAPACITY, qk_scale,
                CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                SPLITS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr, SPLIT_POOL: tl.constexpr, PDL: tl.constexpr):
    """Split `split` of the compressed branch for BLOCK_R rows of group g of batch row b.

    Q [B, S, Hq, DK]; KC, VC [B, capacity_cmp, Hkv, DK / DV]; POOL [B, Hkv, ROWS, NB_CAP = TILES_CAP * NBJ] and
    TMAX [B, Hkv, ROWS, TILES_CAP] float32: pooled scores of block j and row max of tile k.
    """
    _let_next_launch_start(PDL)  # the step's first launch: it follows the cache writes in stream order
    split, r0 = tl.program_id(0) % SPLITS, tl.program_id(0) // SPLITS * BLOCK_R
    g, b = tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed tokens starting in one selection block
    HALO: tl.constexpr = CMP_BLOCK // CMP_STRIDE - 1  # earlier tokens reaching into a block
    NBJ: tl.constexpr = (BLOCK_C - HALO) // R  # whole blocks per tile
    seq_len, _ = _row_length(CACHE_SEQLENS, b, S, CAPACITY, CMP_CAPACITY, CMP_STRIDE, CMP_BLOCK)
    r, s, h, t, row_ok = _group_rows(r0, g, S, G, ROWS, seq_len, BLOCK_R)
    q = tl.load(Q + row_offsets(b, s, h, stride_qb, stride_qs, stride_qh)[:, None] + tl.arange(0, BLOCK_DK)[None, :],
                mask=row_ok[:, None] & (tl.arange(0, BLOCK_DK) < DK)[None, :], other=0.0)
    Kg = KC + b.to(tl.int64) * stride_kb + g * stride_kh
    Vg = VC + b.to(tl.int64) * stride_vb + g * stride_vh
    group = b.to(tl.int64) * Hkv + g
    pool_rows = POOL + (group * ROWS + r)[:, None] * NB_CAP
    w = _pool_weights(CMP_STRIDE, CMP_BLOCK, SLC_BLOCK, HALO, NBJ, BLOCK_C, BLOCK_J)
    a = tl.arange(0, BLOCK_C)
    own = (a >= HALO) & (a < HALO + NBJ * R)  # tokens of the tile's own blocks: attended once, here
    b_col = tl.arange(0, BLOCK_J)

    num_cmp = keys_upto(seq_len - 1, CMP_STRIDE, CMP_BLOCK)  # Tc(L) <= CMP_CAPACITY (_row_length)
    num_tiles = tl.cdiv(tl.cdiv(seq_len, SLC_BLOCK), NBJ)  # tiles covering the blocks 0 .. J(L - 1): <= TILES_CAP
    per_split = tl.cdiv(num_tiles, SPLITS)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for k in range(split * per_split, tl.minimum(split * per_split + per_split, num_tiles)):
        i = k * (NBJ * R) - HALO + a  # compressed tokens of tile k
        key_ok = (i >= 0) & (i < num_cmp)
        kt = load_rows(Kg, i, key_ok, stride_kt, tl.arange(0, BLOCK_DK), DK)
        scores = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * qk_scale
        vis = visible(t[:, None], i[None, :], CMP_STRIDE, CMP_BLOCK, 0) & key_ok[None, :] & row_ok[:, None]
        p, mt = _tile_probs(scores, vis)
        # Block scores of blocks k * NBJ + b, relative to the tile's row max mt.
        pooled = pool_probs(p, w, SPLIT_POOL)
        tl.store(pool_rows + k * NBJ + b_col[None, :], pooled, mask=row_ok[:, None] & (b_col < NBJ)[None, :])
        tl.store(TMAX + (group * ROWS + r) * TILES_CAP + k, mt, mask=row_ok)
        # Attention over the tile's own tokens (the halo belongs to the previous tile).
        vt = load_rows(Vg, i, key_ok & own, stride_vt, tl.arange(0, BLOCK_DV), DV)
        m_i, l_i, acc = _accumulate(m_i, l_i, acc, tl.where(own[None, :], p, 0.0), mt, vt, PRECISION)
    _store_partial(M, L, ACC, split, group, r, row_ok, m_i, l_i, acc, ROWS, SPLITS_TOTAL, DV, BLOCK_DV)


# ----------------------------------------------------------------------------------------------
# 2. Top-n selection: block scores and a top-n per chunk of blocks, then the top-n of the chunks' winners


@triton.jit
def _block_score_kernel(M, L, POOL, TMAX, KEYS, CACHE_SEQLENS, S, G, Hkv, ROWS, SPLITS_TOTAL, NB_CAP, TILES_CAP,
                        CAPACITY, CMP_CAPACITY,
                        CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                        CMP_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr, BLOCK_C: tl.constexpr,
                        CHUNKS: tl.constexpr, CHUNK: tl.constexpr, N_SELECT: tl.constexpr, N_PAD: tl.constexpr,
                        G_PAD: tl.constexpr, PDL: tl.constexpr):
    """Group scores of blocks chunk * CHUNK .. + CHUNK for query s of group g of batch row b, and their top n
    as keys (score bits << 32 | 2^31 - 1 - j, so larger key = larger score, then smaller j; -1: none):
    KEYS [B, Hkv, S, CHUNKS, N_PAD] int64."""
    _let_next_launch_start(PDL)
    chunk, s = tl.program_id(0) % CHUNKS, tl.program_id(0) // CHUNKS
    g, b = tl.program_id(1), tl.program_id(2)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE
    NBJ: tl.constexpr = (BLOCK_C - (CMP_BLOCK // CMP_STRIDE - 1)) // R
    seq_len, ok = _row_length(CACHE_SEQLENS, b, S, CAPACITY, CMP_CAPACITY, CMP_STRIDE, CMP_BLOCK)
    t = seq_len - S + s
    last = t // SLC_BLOCK  # J(t)
    group = b.to(tl.int64) * Hkv + g
    heads = tl.arange(0, G_PAD)
    rows = group * ROWS + s * G + heads
    _wait_for_previous_launch(PDL)  # the compressed kernel's partials and pooled scores
    lse = _merge_lse(M, L, group, 0, CMP_SPLITS, s * G + heads, heads < G, ROWS, SPLITS_TOTAL, SPLIT_CHUNK)
    j = chunk * CHUNK + tl.arange(0, CHUNK)
    candidate = (j <= last) & ok  # j <= J(L - 1) < NB_CAP; none for a row out of range
    # P[j] = sum_h p_slc[h, j] = (1 / d) sum_h pooled[h, j] * 2^(mt[h, tile of j] - lse_h); the 1/d is dropped.
    ok = (heads < G)[:, None] & candidate[None, :]
    mt = tl.load(TMAX + rows[:, None] * TILES_CAP + (j // NBJ)[None, :], mask=ok, other=float("-inf"))
    pooled = tl.load(POOL + rows[:, None] * NB_CAP + j[None, :], mask=ok, other=0.0)
    score = tl.sum(tl.where(mt > float("-inf"), pooled * tl.exp2(mt - lse[:, None]), 0.0), 0)
    top = top_keys(block_keys(score, j, candidate, last)[None, :], N_SELECT, N_PAD)  # [1, N_PAD]
    tl.store(KEYS + ((group * S + s) * CHUNKS + chunk) * N_PAD + tl.arange(0, N_PAD)[None, :], top)


@triton.jit
def _selected_blocks(KEYS, group, S, CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr, N_SELECT: tl.constexpr,
                     N_PAD: tl.constexpr, S_PAD: tl.constexpr):
    """Block ids of the S queries of a group, the top n of their chunks' winners (KEYS [B, Hkv, S, CHUNKS,
    N_PAD]): [S_PAD, N_PAD] int32, each row ascending then -1 (rows >= S all -1)."""
    queries = tl.arange(0, S_PAD)[:, None]
    c = tl.arange(0, CHUNKS_PAD * N_PAD)[None, :]
    keys = tl.load(KEYS + (group * S + queries) * (CHUNKS * N_PAD) + c, mask=(queries < S) & (c < CHUNKS * N_PAD),
                   other=-1)
    return block_ids(top_keys(keys, N_SELECT, N_PAD))


# ----------------------------------------------------------------------------------------------
# 3. Selected and window attention


@triton.jit
def _sparse_kernel(Q, KS, VS, KW, VW, KEYS, IDS, CACHE_SEQLENS, M, L, ACC,
                   stride_qb, stride_qs, stride_qh,
                   stride_ksb, stride_kst, stride_ksh, stride_vsb, stride_vst, stride_vsh,
                   stride_kwb, stride_kwt, stride_kwh, stride_vwb, stride_vwt, stride_vwh,
                   S, G, Hkv, ROWS, SPLITS_TOTAL, CAPACITY, CMP_CAPACITY, qk_scale,
                   CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr, WINDOW: tl.constexpr,
                   N_SELECT: tl.constexpr, N_PAD: tl.constexpr,
                   CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr, S_PAD: tl.constexpr,
                   CMP_SPLITS: tl.constexpr, SLC_SPLITS: tl.constexpr,
                   SWA_SPLITS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Split `split` of the selected branch (split < SLC_SPLITS) or of the window branch (the others).

    Selected: first the selection itself, the top n of the chunks' winners (every selected program of a group
    computes it, a launch fewer, and stores it in IDS [B, Hkv, S, n]); then items (s', slot) = p,
    p + SLC_SPLITS, ... of its S * n slots; a block is attended at its first occurrence (smallest s') only, by
    every row whose query selected it (u <= t).
    Window: tiles k = p, p + SWA_SPLITS, ... of BLOCK_W tokens from L - S - w + 1 (u in (t - w, t]).
    """
    _let_next_launch_start(PDL)
    SPLITS: tl.constexpr = SLC_SPLITS + SWA_SPLITS
    split, r0 = tl.program_id(0) % SPLITS, tl.program_id(0) // SPLITS * BLOCK_R
    g, b = tl.program_id(1), tl.program_id(2)
    seq_len, _ = _row_length(CACHE_SEQLENS, b, S, CAPACITY, CMP_CAPACITY, CMP_STRIDE, CMP_BLOCK)
    r, s, h, t, row_ok = _group_rows(r0, g, S, G, ROWS, seq_len, BLOCK_R)
    q = tl.load(Q + row_offsets(b, s, h, stride_qb, stride_qs, stride_qh)[:, None] + tl.arange(0, BLOCK_DK)[None, :],
                mask=row_ok[:, None] & (tl.arange(0, BLOCK_DK) < DK)[None, :], other=0.0)
    group = b.to(tl.int64) * Hkv + g
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    if split < SLC_SPLITS:
        _wait_for_previous_launch(PDL)  # the chunks' winners
        all_ids = _selected_blocks(KEYS, group, S, CHUNKS, CHUNKS_PAD, N_SELECT, N_PAD, S_PAD)  # [S_PAD, N_PAD]
        queries, slots = tl.arange(0, S_PAD), tl.arange(0, N_PAD)
        ids_group = IDS + group * S * N_SELECT
        # Every selected program of the group stores the same ids (the step's IDS output) and reads back its
        # rows' selections and each item's block (picking them out of registers instead measured the same).
        tl.store(ids_group + queries[:, None] * N_SELECT + slots[None, :], all_ids,
                 mask=(queries < S)[:, None] & (slots < N_SELECT)[None, :])
        tl.debug_barrier()  # the CTA's stores are visible to all its threads
        row_ids = tl.load(ids_group + s[:, None] * N_SELECT + slots[None, :],
                          mask=row_ok[:, None] & (slots < N_SELECT)[None, :], other=-1)  # [BLOCK_R, N_PAD]
        Kg = KS + b.to(tl.int64) * stride_ksb + g * stride_ksh
        Vg = VS + b.to(tl.int64) * stride_vsb + g * stride_vsh
        offs = tl.arange(0, BLOCK_L)
        for item in range(split, S * N_SELECT, SLC_SPLITS):
            blk = tl.load(ids_group + item)
            earlier = tl.sum(tl.where((all_ids == blk) & (queries < item // N_SELECT)[:, None], 1, 0))
            # Masks, not a branch, skip empty slots and repeats (skipped blocks load nothing): the loop stays
            # branch-free for the software pipeliner (measured the same as the branch at batch 32, 64k).
            attend = (blk >= 0) & (earlier == 0)
            chose = (tl.sum(tl.where(row_ids == blk, 1, 0), 1) > 0) & attend
            for start in tl.static_range(0, SLC_BLOCK, BLOCK_L):  # the block in tiles of BLOCK_L tokens
                in_block = start + offs < SLC_BLOCK
                u = blk * SLC_BLOCK + start + offs
                mask = chose[:, None] & in_block[None, :] & (u[None, :] <= t[:, None])
                # Tokens past the row's length are not loaded: the last block may reach past them, even past the
                # cache's capacity, and p = 0 times a stale or out-of-bounds value can still be NaN.
                m_i, l_i, acc = _attend(m_i, l_i, acc, q, Kg, Vg, stride_kst, stride_vst, u,
                                        in_block & attend & (u < seq_len), mask, qk_scale, DK, DV, BLOCK_DK, BLOCK_DV,
                                        PRECISION)
    else:
        Kg = KW + b.to(tl.int64) * stride_kwb + g * stride_kwh
        Vg = VW + b.to(tl.int64) * stride_vwb + g * stride_vwh
        lo = tl.maximum(seq_len - S - WINDOW + 1, 0)  # first key the earliest query sees
        for k in range(split - SLC_SPLITS, tl.cdiv(seq_len - lo, BLOCK_W), SWA_SPLITS):
            u = lo + k * BLOCK_W + tl.arange(0, BLOCK_W)
            mask = visible(t[:, None], u[None, :], 1, 1, WINDOW) & row_ok[:, None]
            m_i, l_i, acc = _attend(m_i, l_i, acc, q, Kg, Vg, stride_kwt, stride_vwt, u, u < seq_len, mask,
                                    qk_scale, DK, DV, BLOCK_DK, BLOCK_DV, PRECISION)
        # The window needs nothing from the step's earlier launches (with PDL it runs beside them); waiting
        # here, before its store, still orders every program after them, which the combine's wait relies on.
        _wait_for_previous_launch(PDL)
    _store_partial(M, L, ACC, CMP_SPLITS + split, group, r, row_ok, m_i, l_i, acc, ROWS, SPLITS_TOTAL, DV, BLOCK_DV)


# ----------------------------------------------------------------------------------------------
# 4. Combine and gate


@triton.jit
def _combine_kernel(M, L, ACC, GATES, O, CACHE_SEQLENS, ERROR_FLAG,
                    stride_gb, stride_gs, stride_gh, stride_ob, stride_os, stride_oh,
                    S, G, Hkv, ROWS, SPLITS_TOTAL, CAPACITY, CMP_CAPACITY,
                    CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_SPLITS: tl.constexpr,
                    SLC_SPLITS: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
                    DV: tl.constexpr, BLOCK_COLS: tl.constexpr, PDL: tl.constexpr):
    """o = g0 * o_cmp + g1 * o_slc + g2 * o_swa for row r (query s, head h), BLOCK_COLS columns of it (several
    programs a row when rows are few: reading the partials is the work); each o_c merges its branch's splits.
    A row out of range (_row_length) gets o = NaN and sets ERROR_FLAG[0] = 1 (ERROR_FLAG int32 [1] or None)."""
    COL_TILES: tl.constexpr = (DV + BLOCK_COLS - 1) // BLOCK_COLS
    r, g, b = tl.program_id(0) // COL_TILES, tl.program_id(1), tl.program_id(2)
    cols = tl.program_id(0) % COL_TILES * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    s, h = r // G, g * G + r % G
    group = b.to(tl.int64) * Hkv + g
    _wait_for_previous_launch(PDL)  # every branch's partials
    branches = (0, CMP_SPLITS, CMP_SPLITS + SLC_SPLITS, SPLITS_TOTAL)  # splits of o_cmp, o_slc, o_swa
    gate = GATES + row_offsets(b, s, h, stride_gb, stride_gs, stride_gh)
    o = tl.zeros([BLOCK_COLS], tl.float32)
    for c in tl.static_range(3):
        o_c = _merge_row(M, L, ACC, group, branches[c], branches[c + 1], r, cols, ROWS, SPLITS_TOTAL, DV, SPLIT_CHUNK)
        o += tl.load(gate + c).to(tl.float32) * o_c
    _, ok = _row_length(CACHE_SEQLENS, b, S, CAPACITY, CMP_CAPACITY, CMP_STRIDE, CMP_BLOCK)
    o = tl.where(ok, o, float("nan"))
    if ERROR_FLAG is not None:
        tl.store(ERROR_FLAG, 1, mask=ok == 0)
    tl.store(O + row_offsets(b, s, h, stride_ob, stride_os, stride_oh) + cols, o.to(O.dtype.element_ty),
             mask=cols < DV)


# ----------------------------------------------------------------------------------------------
# Host side


# Launch options of the two key-reading kernels on a GPU (KernelOptions.decode_* override them): "block", the
# tokens of a key tile (BLOCK_C of the cmp
# kernel, BLOCK_L and BLOCK_W of the sparse kernel), then num_warps and num_stages (overriding the shared-memory
# rule of _launch_options); "score": num_warps of the block-score kernel. Chosen on an H100 with
# benchmarks/profile_decode.py --sweep at 64k (BENCHMARKS.md): batch 32, cmp 105 us at 64 tokens / 4 warps /
# 3 stages (104-121 for the others); sparse 41.8 us at 32 tokens / 4 warps / 2 stages (44.6 at the 64 / 1 stage
# it had, up to 59); block scores 7.7 us at 4 warps (8.5-11 for 1, 2, 8). The sparse kernel is capped at 128
# registers a thread (maxnreg; 137 uncapped since it computes the selection): 4 programs of 4 warps per SM, its
# 512 programs at batch 32 in one wave (50 us against 54 uncapped, no spills; benchmarks/ab_decode.py).
CMP_LAUNCH = dict(block=64, num_warps=4)
SPARSE_LAUNCH = dict(block=32, num_warps=4, num_stages=2, maxnreg=128)
SCORE_LAUNCH = dict(num_warps=4)


def _combine_tiling(rows: int, block_dv: int, split_chunk: int, programs: int, gpu: bool) -> tuple[int, int]:
    """(columns per program, warps) of the combine, for `rows` output rows (all batch rows and groups).

    Its work is reading the partials ([splits, Dv] float32 a row and branch), so rows are cut into column
    tiles (down to 32) until there are `programs` programs. Warps: one for small [split_chunk, columns] tiles
    (H100, 64k, batch 32, 2 splits a branch: 3.7 us against 6.5 on four), four for large ones (batch 1, up to 64
    splits: 4.5 us against 8.9 on one, whole rows). The interpreter's 16 columns make the tests cross tiles.
    """
    cols = block_dv if gpu else 16
    while cols > 32 and rows * (block_dv // cols) < programs:
        cols //= 2
    return cols, 1 if split_chunk * cols <= 512 else 4


def _launch_options(launch: dict, tile_bytes: int) -> dict:
    """Launch keywords of a key-reading kernel (all but its tile size). Unless `launch` names num_stages: software
    pipelining keeps num_stages copies of the key/value tile (tile_bytes) in shared memory (227 KB on an H100), so
    3 stages for tiles under 64 KB, else 2."""
    return {"num_stages": 3 if tile_bytes < 65536 else 2, **{k: v for k, v in launch.items() if k != "block"}}


# Programmatic dependent launch (Hopper and later; KernelOptions.pdl): each launch after the first starts while the
# previous one runs and waits inside (griddepcontrol) for its results, so launch latency and prologues overlap (the
# step is four short launches; at batch 1 each is a few microseconds).


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _has_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def target_programs(device: torch.device, options: KernelOptions = KernelOptions()) -> int:
    """Programs per key-splitting launch to aim for: options.decode_programs if set, else one per SM (8 in the
    interpreter, so tests cross splits).

    One per SM measured faster than two or four on an H100 at 64k and 128k, batch 1 and 32 (benchmarks/
    profile_decode.py): more splits add merge work and do not make the memory-bound kernels faster.
    """
    if options.decode_programs is not None:
        return options.decode_programs
    if interpreting() or device.type != "cuda":
        return 8
    return _sm_count(_device_index(device))


def _splits(want: int, most: int) -> int:
    return max(1, min(want, most))


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def nsa_decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config: NSAConfig,
                         scale, *, error_flag: torch.Tensor | None = None, return_block_ids: bool = False,
                         kernel_options: KernelOptions = KernelOptions()):
    """One NSA decoding step (inputs validated by ops/checks.py: check_decode_inputs).

    q [B, S, Hq, Dk], gates [B, S, Hq, 3]; k_slc, v_slc, k_swa, v_swa [B, capacity, Hkv, Dk / Dv];
    k_cmp, v_cmp [B, capacity_cmp, Hkv, Dk / Dv]; cache_seqlens int32 [B] on q's device, never read on the host:
    a row out of range (L < S, L > capacity or Tc(L) > capacity_cmp) gets NaN outputs (and block ids -1) and sets
    error_flag (int32 [1], or None) to 1, touching nothing outside the buffers. The last dims must be contiguous
    (other strides are free). Returns o [B, S, Hq, Dv] in q's dtype; with return_block_ids also the
    selection, int32 [B, S, Hkv, n] (ids ascending, then -1).
    """
    check_backend_inputs(q, (q.shape[-1], v_cmp.shape[-1]))
    check_pooling(config, q.dtype)
    tensors = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        raise RuntimeError("the Triton decoding step is inference only (no backward): run it under torch.no_grad() "
                           "or torch.inference_mode()")
    if any(x.stride(-1) != 1 for x in tensors):
        raise ValueError("the Triton decoding step needs tensors whose last dim is contiguous")
    B, S, Hq, Dk = q.shape
    Hkv, Dv = k_cmp.shape[2], v_cmp.shape[3]
    G, rows = Hq // Hkv, S * Hq // Hkv
    d, l, lp, n = config.cmp_stride, config.cmp_block, config.slc_block, config.num_selected
    dev = q.device
    block_dk, block_dv = pow2_at_least(Dk), pow2_at_least(Dv)
    gpu = not interpreting()
    options = kernel_options
    cmp_launch = options.decode_cmp.over(CMP_LAUNCH)
    sparse_launch = options.decode_sparse.over(SPARSE_LAUNCH)
    pdl = gpu and options.pdl and _has_pdl(_device_index(dev))
    dependent = dict(PDL=pdl, launch_pdl=pdl)  # a launch that waits for the previous one inside

    # Tiles (the interpreter's are small so that the tests cross tile and split boundaries).
    block_r = min(pow2_at_least(rows), (64 if max(block_dk, block_dv) <= 128 else 32) if gpu else 16)
    row_tiles = triton.cdiv(rows, block_r)
    per_block, halo = lp // d, l // d - 1
    cmp_tile, sparse_tile = (cmp_launch["block"], sparse_launch["block"]) if gpu else (16, 16)
    block_c = max(cmp_tile, triton.next_power_of_2(per_block + halo))
    nbj = (block_c - halo) // per_block  # whole selection blocks per compressed tile
    block_j = pow2_at_least(nbj)
    block_l, block_w = min(pow2_at_least(lp), sparse_tile), sparse_tile
    capacity, cmp_capacity = k_slc.shape[1], k_cmp.shape[1]  # the kernels' bounds on any row's length
    tiles_cap = triton.cdiv(triton.cdiv(capacity, lp), nbj)
    nb_cap = tiles_cap * nbj  # pooled scores per row: every tile writes all its nbj blocks, even past the capacity
    n_pad = triton.next_power_of_2(n)
    chunk = max(128 if gpu else 4, n_pad)  # blocks scored (and reduced to their top n) per program
    chunks = triton.cdiv(triton.cdiv(capacity, lp), chunk)  # over the blocks a row can hold

    # Splits: enough programs to fill the GPU even with one sequence, at most one tile (block) per program.
    programs = target_programs(dev, options)
    want = triton.cdiv(programs, B * Hkv * row_tiles)
    cmp_splits = _splits(want, tiles_cap)
    slc_splits = _splits(want, S * n)
    swa_splits = _splits(want, triton.cdiv(config.window + S - 1, block_w))
    total = cmp_splits + slc_splits + swa_splits
    # Splits a merge reads at once: all of a branch's in one trip, up to 64 (the interpreter's 2 cross trips).
    split_chunk = min(64, triton.next_power_of_2(max(cmp_splits, slc_splits, swa_splits))) if gpu else 2

    f32 = dict(device=dev, dtype=torch.float32)
    m_part, l_part = torch.empty(B, Hkv, total, rows, **f32), torch.empty(B, Hkv, total, rows, **f32)
    acc_part = torch.empty(B, Hkv, total, rows, Dv, **f32)
    pooled = torch.empty(B, Hkv, rows, nb_cap, **f32)
    tile_max = torch.empty(B, Hkv, rows, tiles_cap, **f32)
    keys = torch.empty(B, Hkv, S, chunks, n_pad, device=dev, dtype=torch.int64)
    ids = torch.empty(B, Hkv, S, n, device=dev, dtype=torch.int32)
    o = torch.empty(B, S, Hq, Dv, device=dev, dtype=q.dtype)
    qk_scale = scale * LOG2E
    precision = dot_precision(q.dtype)
    common = dict(DK=Dk, DV=Dv, BLOCK_R=block_r, BLOCK_DK=block_dk, BLOCK_DV=block_dv)
    token_bytes = (block_dk + block_dv) * q.element_size()  # one key and its value in a tile
    partials = (m_part, l_part, acc_part)

    _cmp_kernel[(cmp_splits * row_tiles, Hkv, B)](
        q, k_cmp, v_cmp, cache_seqlens, *partials, pooled, tile_max, *_strides(q), *_strides(k_cmp), *_strides(v_cmp),
        S, G, Hkv, rows, total, nb_cap, tiles_cap, capacity, cmp_capacity, qk_scale,
        CMP_STRIDE=d, CMP_BLOCK=l, SLC_BLOCK=lp, SPLITS=cmp_splits, BLOCK_C=block_c, BLOCK_J=block_j,
        PRECISION=precision, SPLIT_POOL=q.dtype != torch.float32, PDL=pdl, **common,
        **_launch_options(cmp_launch, block_c * token_bytes))
    _block_score_kernel[(chunks * S, Hkv, B)](
        m_part, l_part, pooled, tile_max, keys, cache_seqlens, S, G, Hkv, rows, total, nb_cap, tiles_cap, capacity,
        cmp_capacity,
        CMP_STRIDE=d, CMP_BLOCK=l, SLC_BLOCK=lp, CMP_SPLITS=cmp_splits, SPLIT_CHUNK=split_chunk, BLOCK_C=block_c,
        CHUNKS=chunks, CHUNK=chunk, N_SELECT=n, N_PAD=n_pad, G_PAD=triton.next_power_of_2(G), **dependent,
        **options.decode_score.over(SCORE_LAUNCH))
    _sparse_kernel[((slc_splits + swa_splits) * row_tiles, Hkv, B)](
        q, k_slc, v_slc, k_swa, v_swa, keys, ids, cache_seqlens, *partials, *_strides(q),
        *_strides(k_slc), *_strides(v_slc), *_strides(k_swa), *_strides(v_swa), S, G, Hkv, rows, total, capacity,
        cmp_capacity, qk_scale, CMP_STRIDE=d, CMP_BLOCK=l, SLC_BLOCK=lp, WINDOW=config.window, N_SELECT=n, N_PAD=n_pad,
        CHUNKS=chunks, CHUNKS_PAD=triton.next_power_of_2(chunks), S_PAD=triton.next_power_of_2(S),
        CMP_SPLITS=cmp_splits, SLC_SPLITS=slc_splits, SWA_SPLITS=swa_splits,
        BLOCK_L=block_l, BLOCK_W=block_w, PRECISION=precision, **common, **dependent,
        **_launch_options(sparse_launch, max(block_l, block_w) * token_bytes))
    block_cols, combine_warps = _combine_tiling(B * Hkv * rows, block_dv, split_chunk, programs, gpu)
    _combine_kernel[(rows * triton.cdiv(Dv, block_cols), Hkv, B)](
        *partials, gates, o, cache_seqlens, error_flag, *_strides(gates), *_strides(o), S, G, Hkv, rows, total,
        capacity, cmp_capacity, CMP_STRIDE=d, CMP_BLOCK=l, CMP_SPLITS=cmp_splits, SLC_SPLITS=slc_splits,
        SPLIT_CHUNK=split_chunk, DV=Dv, BLOCK_COLS=block_cols, num_warps=combine_warps, **dependent)
    if return_block_ids:
        return o, ids.transpose(1, 2)
    return o
