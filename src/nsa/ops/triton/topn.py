"""Block selection of NSA's selected branch in Triton (SPEC.md, branch 2).

For query t and GQA group g, the score of selection block j is
    P[g, t, j] = sum_{h in g} sum_{i in C(t)} W[i, j] * p_cmp[h, t, i],
    p_cmp[h, t, i] = exp(scale * q[t, h] . k_cmp[i, g] - lse_cmp[h, t]),
    W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.
Candidates are j <= J(t) = floor(t / l'); blocks 0, J(t), J(t) - 1 are forced; the n best candidates
are kept, returned ascending with -1 in unused slots.

Two kernels, launched over bounded slices of the queries so that the score buffer stays small:
  1. _group_score_kernel, grid (query tiles, Hkv, batch): a program holds the q rows of all heads of
     its group for BLOCK_T queries (rows = query x head) and streams the compressed keys in chunks of
     CHUNK selection blocks, like a flash-attention forward. Per chunk it pools p_cmp onto blocks with
     a matmul by a constant weight tile (W_cur onto the chunk's own blocks, W_next onto the following
     CHUNK blocks, which tokens near a chunk's end reach; that part is carried into the next chunk;
     two float16 matmuls each for 16-bit inputs, see utils.pool_probs), sums the heads (W is linear, so
     pooling first is exact) and writes P to a float32 buffer.
  2. _top_n_kernel, grid (row tiles, Hkv, batch): loads whole score rows as sortable keys (utils.block_keys:
     forced blocks first) and takes the n best by n rounds of one max-reduction each.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import NSAConfig
from .utils import (LOG2E, LOG2E_K, block_ids, block_keys, check_kernel_dtype, check_pooling, dot_precision, interpreting,
                    keys_upto, last_dim_contiguous, pool_probs, query_offset, query_offsets, seq_bounds, top_keys,
                    pow2_at_least, visible)


@triton.jit
def _pool_weights(CHUNK_OFFSET: tl.constexpr, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
                  SLC_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr):
    """d * W[a, b] for the a-th token of a chunk and the block CHUNK_OFFSET + b after the chunk's first:
    [BLOCK_C, CHUNK].

    Tokens and blocks are counted from the chunk's start, which is a block boundary, so the tile is the same for
    every chunk. The overlaps are integers (exact in any dot precision); the 1 / d is applied to the pooled sums.
    """
    start = tl.arange(0, BLOCK_C)[:, None] * CMP_STRIDE
    block = CHUNK_OFFSET + tl.arange(0, CHUNK)[None, :]
    overlap = tl.minimum(start + CMP_BLOCK, (block + 1) * SLC_BLOCK) - tl.maximum(start, block * SLC_BLOCK)
    return tl.maximum(overlap, 0).to(tl.float32)


@triton.jit
def _group_score_kernel(Q, KC, LSE, P, CU_Q, CU_K, Q_OFFSETS,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_pb, stride_pt, stride_ph,
                        T, Tc, Hq, G, row0, qk_scale, q_offset,
                        CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                        IS_VARLEN: tl.constexpr, DK: tl.constexpr, BLOCK_DK: tl.constexpr,
                        BLOCK_T: tl.constexpr, HEADS: tl.constexpr, CHUNK: tl.constexpr, C_PAD: tl.constexpr,
                        PRECISION: tl.constexpr, SPLIT_POOL: tl.constexpr):
    """Group scores P[g, t, j] of BLOCK_T query rows t >= row0 of one GQA group, every block j <= J(last query);
    row t sits at position t + offset (utils.query_offset).

    Q [B, T, Hq, DK], KC [B, Tc, Hkv, DK], LSE [B, Hq, T] float32 (the compressed branch's log-sum-exp),
    P [B, rows, Hkv, Nb] float32: row t - row0 of each sequence.
    """
    g = tl.program_id(1)
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(2), T, IS_VARLEN)
    _, k0, Tc_seq = seq_bounds(CU_K, tl.program_id(2), Tc, IS_VARLEN)
    offset = query_offset(Q_OFFSETS, tl.program_id(2), q_offset, IS_VARLEN)
    m0 = row0 + tl.program_id(0) * BLOCK_T
    if m0 >= T_seq:
        return
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed tokens starting in one selection block
    BLOCK_C: tl.constexpr = CHUNK * R  # the chunk's tokens, padded below to C_PAD (a power of two) for the tiles
    t = m0 + tl.arange(0, BLOCK_T)
    # Rows of the score tile: BLOCK_T queries x HEADS heads, row = query * HEADS + head (a query's heads are
    # adjacent in q).
    row_t = m0 + tl.arange(0, BLOCK_T * HEADS) // HEADS
    row_h = tl.arange(0, BLOCK_T * HEADS) % HEADS
    cols = tl.arange(0, BLOCK_DK)
    Qb = Q + batch * stride_qb + q0 * stride_qt
    Kg = KC + batch * stride_kb + k0 * stride_kt + g * stride_kh
    Pg = P + tl.program_id(2).to(tl.int64) * stride_pb + (t - row0).to(tl.int64)[:, None] * stride_pt + g * stride_ph
    w_cur = _pool_weights(0, CMP_STRIDE, CMP_BLOCK, SLC_BLOCK, C_PAD, CHUNK)
    w_next = _pool_weights(CHUNK, CMP_STRIDE, CMP_BLOCK, SLC_BLOCK, C_PAD, CHUNK)
    in_chunk = tl.arange(0, C_PAD) < BLOCK_C  # padding tokens belong to the next chunk, which counts them

    m_last = tl.minimum(m0 + BLOCK_T, T_seq) - 1 + offset  # the last query's position
    num_blocks = m_last // SLC_BLOCK + 1  # blocks that are candidates of some query of the tile
    num_tokens = tl.minimum(keys_upto(m_last, CMP_STRIDE, CMP_BLOCK), Tc_seq)  # tokens the tile can see
    for h0 in range(0, G, HEADS):  # one slice unless G > HEADS; later slices add onto the stored scores
        head = g * G + h0 + row_h
        row_ok = (h0 + row_h < G) & (row_t < T_seq)
        q = tl.load(Qb + row_t.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :],
                    mask=row_ok[:, None] & (cols < DK)[None, :], other=0.0)
        lse2 = tl.load(LSE + (batch * Hq + head) * T + q0 + row_t, mask=row_ok, other=0.0) * LOG2E_K
        carried = tl.zeros([BLOCK_T * HEADS, CHUNK], tl.float32)  # d * pooled p_cmp of the next chunk's blocks
        for j0 in range(0, num_blocks, CHUNK):
            i = j0 * R + tl.arange(0, C_PAD)
            k = tl.load(Kg + i.to(tl.int64)[:, None] * stride_kt + cols[None, :],
                        mask=(i < num_tokens)[:, None] & (cols < DK)[None, :], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            vis = (visible(row_t[:, None] + offset, i[None, :], CMP_STRIDE, CMP_BLOCK, 0)
                   & (in_chunk & (i < Tc_seq))[None, :])
            p = tl.where(vis & row_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)  # p_cmp [rows, C_PAD]
            pooled = carried + pool_probs(p, w_cur, SPLIT_POOL)  # d * p_slc [rows, CHUNK]
            carried = pool_probs(p, w_next, SPLIT_POOL)
            score = tl.sum(tl.reshape(pooled, (BLOCK_T, HEADS, CHUNK)), 1) * (1.0 / CMP_STRIDE)
            j = j0 + tl.arange(0, CHUNK)[None, :]
            ptr = Pg + j
            keep = (t < T_seq)[:, None] & (j < num_blocks)
            score += tl.load(ptr, mask=keep & (h0 > 0), other=0.0)
            tl.store(ptr, score, mask=keep)


@triton.jit
def _top_n_kernel(P, OUT, CU_Q, Q_OFFSETS, stride_pb, stride_pt, stride_ph, stride_ob, stride_ot, stride_oh, T, row0,
                  q_offset,
                  SLC_BLOCK: tl.constexpr, N_SELECT: tl.constexpr, N_PAD: tl.constexpr, NB_PAD: tl.constexpr,
                  BLOCK_R: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Ids of the n best blocks, ascending then -1, of BLOCK_R query rows t >= row0 (at positions t + offset) of
    one group.

    P [B, rows, Hkv, Nb] float32 group scores (row t - row0), OUT [B, T, Hkv, N_SELECT] int32.
    """
    g = tl.program_id(1)
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(2), T, IS_VARLEN)
    m0 = row0 + tl.program_id(0) * BLOCK_R
    if m0 >= T_seq:
        return
    t = m0 + tl.arange(0, BLOCK_R)
    last = ((t + query_offset(Q_OFFSETS, tl.program_id(2), q_offset, IS_VARLEN)) // SLC_BLOCK)[:, None]  # J(t)
    j = tl.arange(0, NB_PAD)[None, :]
    candidate = (j <= last) & (t < T_seq)[:, None]
    Pg = P + tl.program_id(2).to(tl.int64) * stride_pb + (t - row0).to(tl.int64)[:, None] * stride_pt + g * stride_ph
    score = tl.load(Pg + j, mask=candidate, other=0.0)
    ids = block_ids(top_keys(block_keys(score, j, candidate, last), N_SELECT, N_PAD))  # [BLOCK_R, N_PAD]
    slots = tl.arange(0, N_PAD)[None, :]
    out = OUT + batch * stride_ob + (q0 + t).to(tl.int64)[:, None] * stride_ot + g * stride_oh + slots
    tl.store(out, ids, mask=(t < T_seq)[:, None] & (slots < N_SELECT))


def _score_params(G: int, tokens_per_block: int, block_dk: int) -> dict:
    """Tile of _group_score_kernel: about 128 rows (queries x heads) and 64 compressed tokens per chunk on the GPU.

    tokens_per_block: r = l' / d (any: a chunk's CHUNK * r tokens are padded to C_PAD, a power of two). Fewer
    rows for wide heads or long chunks, so q, two key tiles and the [rows, chunk tokens] scores fit in shared memory and registers (head dim 256: q 64 KB + 2 x 32 KB keys).
    Interpreter: tiny tiles so that small tests cross chunk and head-slice boundaries.
    """
    heads_pow2 = triton.next_power_of_2(G)
    if interpreting():
        chunk = 2
        return dict(BLOCK_T=16, HEADS=min(heads_pow2, 2), CHUNK=chunk,
                    C_PAD=triton.next_power_of_2(chunk * tokens_per_block), num_warps=1, num_stages=1)
    chunk = max(16, 1 << ((64 // tokens_per_block).bit_length() - 1))  # a power of two; tl.dot needs >= 16
    block_c = triton.next_power_of_2(chunk * tokens_per_block)
    rows = max(16, min(128 * 128 // max(block_dk, 128), 16384 // block_c))
    heads = min(heads_pow2, rows)
    # 3 stages at D 128: 18.7 ms against 20.7 with 2 (H100, shape P, 64k, when pooling was tf32x3)
    stages = 3 if block_c * block_dk <= 8192 else 2 if block_c * block_dk <= 32768 else 1
    # 4 warps: 8.3 ms against 10.7 ms with 8 for 128 rows (H100, shape P, 64k; benchmarks/profile_selection.py, since retired)
    return dict(BLOCK_T=rows // heads, HEADS=heads, CHUNK=chunk, C_PAD=block_c, num_warps=4, num_stages=stages)


def _top_n_params(nb_pad: int) -> dict:
    """Tile of _top_n_kernel: one query's row of nb_pad keys, a warp per 1024 keys (H100, 64k: 2.7 ms for shape P,
    against 3.7 ms for 4 rows on 4 warps and 8.6 ms for 16 rows on 8 warps; benchmarks/profile_selection.py, since retired).
    Interpreter: 16 rows, since its cost is per program."""
    if interpreting():
        return dict(BLOCK_R=16, num_warps=1)
    return dict(BLOCK_R=1, num_warps=max(1, min(8, nb_pad // 1024)))


def _rows_per_launch(rows_cap: int, per_row_bytes: int) -> int:
    """Queries per sequence scored per launch pair: the score buffer stays under 256 MB (64 rows in the interpreter)."""
    if interpreting():
        return 64
    return max(128, min(rows_cap, (256 << 20) // per_row_bytes) // 128 * 128)


def select_blocks_fwd(q, k_cmp, lse_cmp, config: NSAConfig, scale, *,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, q_offset=0, q_offsets=None,
                      max_query_end=None):
    """Top-n selection blocks of each query's GQA group.

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], lse_cmp [B, Hq, T] float32 from banded_attention_fwd of the
    compressed branch (same q, k_cmp and scale). Packed: B == 1, cu_seqlens_q int32 [N + 1] of the raw
    tokens and cu_seqlens_k int32 [N + 1] of the compressed tokens.
    Suffix queries: row t sits at position t + q_offset (dense) or t + q_offsets[s] (packed, int32 [N]);
    max_query_end, the largest raw length (last query's position + 1), sizes the score rows (packed batches with
    q_offsets should pass it, else it is read from the device).
    Returns int32 [B, T, Hkv, n]: each row the ids ascending, then -1 in unused slots.
    """
    check_kernel_dtype(q, k_cmp)
    check_pooling(config, q.dtype)
    q, k_cmp = last_dim_contiguous(q), last_dim_contiguous(k_cmp)
    lse_cmp = lse_cmp.contiguous()
    B, T, Hq, Dk = q.shape
    Tc, Hkv = k_cmp.shape[1], k_cmp.shape[2]
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k, or neither")
    varlen = cu_seqlens_q is not None
    if varlen and max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    max_t = max_seqlen_q if varlen else T
    if max_query_end is None:
        max_query_end = max_t + (int(q_offsets.max()) if q_offsets is not None and q_offsets.numel() else q_offset)
    q_offsets = query_offsets(cu_seqlens_q, q_offsets)
    n = config.num_selected
    out = torch.empty(B, T, Hkv, n, device=q.device, dtype=torch.int32)
    if T == 0:
        return out
    nseq = cu_seqlens_q.numel() - 1 if varlen else B
    nb = triton.cdiv(max_query_end, config.slc_block)
    rows = _rows_per_launch(max_t, nseq * Hkv * nb * 4)
    scores = torch.empty(nseq, min(rows, max_t), Hkv, nb, device=q.device, dtype=torch.float32)
    p = _score_params(Hq // Hkv, config.slc_block // config.cmp_stride, pow2_at_least(Dk))
    nb_pad = max(triton.next_power_of_2(nb), triton.next_power_of_2(n))  # top_keys takes rows of >= N_PAD keys
    top_n = _top_n_params(nb_pad)
    for row0 in range(0, max_t, rows):
        span = min(rows, max_t - row0)
        _group_score_kernel[(triton.cdiv(span, p["BLOCK_T"]), Hkv, nseq)](
            q, k_cmp, lse_cmp, scores, cu_seqlens_q, cu_seqlens_k, q_offsets,
            q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
            scores.stride(0), scores.stride(1), scores.stride(2),
            T, Tc, Hq, Hq // Hkv, row0, scale * LOG2E, q_offset,
            CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block, SLC_BLOCK=config.slc_block,
            IS_VARLEN=varlen, DK=Dk, BLOCK_DK=pow2_at_least(Dk),
            PRECISION=dot_precision(q.dtype), SPLIT_POOL=q.dtype != torch.float32, **p)
        _top_n_kernel[(triton.cdiv(span, top_n["BLOCK_R"]), Hkv, nseq)](
            scores, out, cu_seqlens_q, q_offsets, scores.stride(0), scores.stride(1), scores.stride(2),
            out.stride(0), out.stride(1), out.stride(2), T, row0, q_offset,
            SLC_BLOCK=config.slc_block, N_SELECT=n, N_PAD=triton.next_power_of_2(n), NB_PAD=nb_pad,
            IS_VARLEN=varlen, **top_n)
    return out
