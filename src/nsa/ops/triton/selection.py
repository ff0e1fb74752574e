"""Block selection of NSA's selected branch in Triton (SPEC.md, branch 2).

For query t and GQA group g, the score of selection block j is
    P[g, t, j] = sum_{h in g} sum_{i in C(t)} W[i, j] * p_cmp[h, t, i],
    p_cmp[h, t, i] = exp(scale * q[t, h] . k_cmp[i, g] - lse_cmp[h, t]),
    W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d.
Candidates are j <= J(t) = floor(t / l'); blocks 0, J(t), J(t) - 1 are forced; the n best candidates
are kept, returned ascending with -1 in unused slots.

One kernel, _select_kernel, grid (query tiles, Hkv, batch). A program holds BLOCK_T queries of one
group and walks the candidate blocks in chunks of CHUNK selection blocks; the compressed tokens that
start inside a chunk are i in [j0*r, (j0 + CHUNK)*r), r = l' / d. Per chunk it
  1. scores those tokens against HEADS query heads at a time (rows = heads x queries) and sums
     p_cmp over the heads of the group (W is linear, so summing heads first is exact);
  2. pools the token sums onto blocks with two small matmuls by constant weight tiles: W_cur onto
     the chunk's own blocks and W_next onto the following CHUNK blocks, which tokens near the end of
     a chunk reach (l can exceed l'); the W_next part is carried into the next chunk;
  3. merges the chunk's finished scores into a running top-n held in registers.
Memory is O(1) in T: no score row [T, Nb] is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...config import NSAConfig
from .utils import LOG2E, check_kernel_dtype, dot_precision, interpreting, keys_upto, last_dim_contiguous, seq_bounds, visible


@triton.jit
def _pool_weights(CHUNK_OFFSET: tl.constexpr, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
                  SLC_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, CHUNK: tl.constexpr):
    """W[a, b] for the a-th token of a chunk and the block CHUNK_OFFSET + b after the chunk's first: [BLOCK_C, CHUNK].

    Tokens and blocks are counted from the chunk's start, which is a block boundary, so the tile is the same for every chunk.
    """
    start = tl.arange(0, BLOCK_C)[:, None] * CMP_STRIDE
    block = CHUNK_OFFSET + tl.arange(0, CHUNK)[None, :]
    overlap = tl.minimum(start + CMP_BLOCK, (block + 1) * SLC_BLOCK) - tl.maximum(start, block * SLC_BLOCK)
    return tl.maximum(overlap, 0).to(tl.float32) / CMP_STRIDE


@triton.jit
def _merge_top(top_s, top_id, score, j0, CHUNK: tl.constexpr, N_PAD: tl.constexpr):
    """Merges score [BLOCK_T, CHUNK] (block ids j0 + column) into the running top list (top_s, top_id) [BLOCK_T, N_PAD].

    While some row's best remaining entry beats the smallest score it keeps, that entry replaces it.
    Each row's list keeps its n best entries seen so far (slots past n hold +inf and are never replaced).
    """
    slots = tl.arange(0, N_PAD)[None, :]
    cols = tl.arange(0, CHUNK)[None, :]
    best = tl.max(score, 1)
    worst = tl.min(top_s, 1)
    while tl.max((best > worst).to(tl.int32), 0) > 0:
        take = (best > worst)[:, None]
        at = tl.argmax(score, 1)[:, None]
        hit = take & (slots == tl.argmin(top_s, 1)[:, None])
        top_s = tl.where(hit, best[:, None], top_s)
        top_id = tl.where(hit, j0 + at, top_id)
        score = tl.where(cols == at, float("-inf"), score)
        best = tl.max(score, 1)
        worst = tl.min(top_s, 1)
    return top_s, top_id


@triton.jit
def _select_kernel(Q, KC, LSE, OUT, CU_Q, CU_K,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_ob, stride_ot, stride_oh,
                   T, Tc, Hq, G, qk_scale,
                   CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr, SLC_BLOCK: tl.constexpr,
                   N_SELECT: tl.constexpr, IS_VARLEN: tl.constexpr,
                   DK: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_T: tl.constexpr, HEADS: tl.constexpr,
                   CHUNK: tl.constexpr, N_PAD: tl.constexpr, PRECISION: tl.constexpr):
    """Selected block ids of BLOCK_T queries of one GQA group.

    Q [B, T, Hq, DK], KC [B, Tc, Hkv, DK], LSE [B, Hq, T] float32 (the compressed branch's log-sum-exp),
    OUT [B, T, Hkv, N_SELECT] int32.
    """
    g = tl.program_id(1)
    batch, q0, T_seq = seq_bounds(CU_Q, tl.program_id(2), T, IS_VARLEN)
    _, k0, Tc_seq = seq_bounds(CU_K, tl.program_id(2), Tc, IS_VARLEN)
    m0 = tl.program_id(0) * BLOCK_T
    if m0 >= T_seq:
        return
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed tokens starting in one selection block
    BLOCK_C: tl.constexpr = CHUNK * R
    t = m0 + tl.arange(0, BLOCK_T)
    last = t // SLC_BLOCK  # J(t)
    # Rows of the score tile: HEADS heads x BLOCK_T queries, row = head * BLOCK_T + query.
    row_t = m0 + tl.arange(0, HEADS * BLOCK_T) % BLOCK_T
    row_h = tl.arange(0, HEADS * BLOCK_T) // BLOCK_T
    cols = tl.arange(0, BLOCK_DK)
    Qb = Q + batch * stride_qb + q0 * stride_qt
    Kg = KC + batch * stride_kb + k0 * stride_kt + g * stride_kh
    w_cur = _pool_weights(0, CMP_STRIDE, CMP_BLOCK, SLC_BLOCK, BLOCK_C, CHUNK)
    w_next = _pool_weights(CHUNK, CMP_STRIDE, CMP_BLOCK, SLC_BLOCK, BLOCK_C, CHUNK)

    top_s = tl.where(tl.arange(0, N_PAD)[None, :] < N_SELECT, float("-inf"), float("inf")) + \
        tl.zeros([BLOCK_T, N_PAD], tl.float32)
    top_id = tl.full([BLOCK_T, N_PAD], -1, tl.int32)
    carried = tl.zeros([BLOCK_T, CHUNK], tl.float32)  # scores of the next chunk's blocks from earlier tokens
    m_last = tl.minimum(m0 + BLOCK_T, T_seq) - 1
    num_tokens = tl.minimum(keys_upto(m_last, CMP_STRIDE, CMP_BLOCK), Tc_seq)  # tokens the tile can see
    for j0 in range(0, m_last // SLC_BLOCK + 1, CHUNK):  # chunks holding a candidate block
        i = j0 * R + tl.arange(0, BLOCK_C)
        k = tl.load(Kg + i.to(tl.int64)[:, None] * stride_kt + cols[None, :],
                    mask=(i < num_tokens)[:, None] & (cols < DK)[None, :], other=0.0)
        # group sum over the heads of sum_i p_cmp[h, t, i] for the chunk's tokens: [BLOCK_T, BLOCK_C]
        p_group = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
        for h0 in range(0, G, HEADS):
            head = g * G + h0 + row_h
            row_ok = (h0 + row_h < G) & (row_t < T_seq)
            q = tl.load(Qb + row_t.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + cols[None, :],
                        mask=row_ok[:, None] & (cols < DK)[None, :], other=0.0)
            lse2 = tl.load(LSE + (batch * Hq + head) * T + q0 + row_t, mask=row_ok, other=0.0) * 1.4426950408889634
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            vis = visible(row_t[:, None], i[None, :], CMP_STRIDE, CMP_BLOCK, 0) & (i < Tc_seq)[None, :]
            p = tl.where(vis & row_ok[:, None], tl.exp2(s - lse2[:, None]), 0.0)
            p_group += tl.sum(tl.reshape(p, (HEADS, BLOCK_T, BLOCK_C)), 0)
        score = carried + tl.dot(p_group, w_cur, input_precision="ieee")
        carried = tl.dot(p_group, w_next, input_precision="ieee")

        j = j0 + tl.arange(0, CHUNK)[None, :]
        candidate = j <= last[:, None]
        # Forced blocks outrank every score, in the order J(t), J(t) - 1, 0 (which matters only if n < 3).
        score = tl.where(candidate, score, float("-inf"))
        score = tl.where(j == 0, 1.5e38, score)
        score = tl.where(j == last[:, None] - 1, 3.0e38, score)
        score = tl.where(j == last[:, None], float("inf"), score)
        top_s, top_id = _merge_top(top_s, top_id, score, j0, CHUNK, N_PAD)

    # Ascending ids; empty slots (score -inf: fewer candidates than n) sort last and become -1.
    big = 2147483647
    slots = tl.arange(0, N_PAD)[None, :]
    ids = tl.sort(tl.where((top_s > float("-inf")) & (slots < N_SELECT), top_id, big), 1)
    ids = tl.where(ids == big, -1, ids)
    out = OUT + batch * stride_ob + (q0 + t).to(tl.int64)[:, None] * stride_ot + g * stride_oh + slots
    tl.store(out, ids, mask=(t < T_seq)[:, None] & (slots < N_SELECT))


def _launch_params(G: int, blocks_per_chunk_tokens: int, block_dk: int) -> dict:
    """Tile shape: about 128 score rows (heads x queries) on the GPU, fewer when a chunk holds many tokens.

    blocks_per_chunk_tokens: r = l' / d, compressed tokens per selection block.
    Interpreter: tiny tiles so that small tests cross chunk and head-slice boundaries.
    """
    heads_pow2 = triton.next_power_of_2(G)
    if interpreting():
        return dict(BLOCK_T=16, HEADS=min(heads_pow2, 2), CHUNK=2, num_warps=1, num_stages=1)
    chunk = 16  # tl.dot needs >= 16 on every dim
    # 128 rows for head dims up to 128; fewer for wider heads, whose q and k tiles fill shared memory
    rows = max(16, min(128 * 128 // max(block_dk, 128), 16384 // (chunk * blocks_per_chunk_tokens)))
    heads = min(heads_pow2, rows // 16)
    # double-buffer the key tile [chunk * r, block_dk] only while two copies fit beside the q tile
    stages = 2 if chunk * blocks_per_chunk_tokens * block_dk <= 32768 else 1
    return dict(BLOCK_T=rows // heads, HEADS=heads, CHUNK=chunk, num_warps=4 if rows <= 64 else 8, num_stages=stages)


def select_blocks_fwd(q, k_cmp, lse_cmp, config: NSAConfig, scale, *,
                      cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None):
    """Top-n selection blocks of each query's GQA group.

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], lse_cmp [B, Hq, T] float32 from banded_attention_fwd of the
    compressed branch (same q, k_cmp and scale). Packed: B == 1, cu_seqlens_q int32 [N + 1] of the raw
    tokens and cu_seqlens_k int32 [N + 1] of the compressed tokens.
    Returns int32 [B, T, Hkv, n]: each row the ids ascending, then -1 in unused slots.
    """
    check_kernel_dtype(q, k_cmp)
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
    n = config.num_selected
    out = torch.empty(B, T, Hkv, n, device=q.device, dtype=torch.int32)
    if T == 0:
        return out
    p = _launch_params(Hq // Hkv, config.slc_block // config.cmp_stride, triton.next_power_of_2(Dk))
    grid = (triton.cdiv(max_t, p["BLOCK_T"]), Hkv, cu_seqlens_q.numel() - 1 if varlen else B)
    _select_kernel[grid](
        q, k_cmp, lse_cmp, out, cu_seqlens_q, cu_seqlens_k,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        T, Tc, Hq, Hq // Hkv, scale * LOG2E,
        CMP_STRIDE=config.cmp_stride, CMP_BLOCK=config.cmp_block, SLC_BLOCK=config.slc_block,
        N_SELECT=n, IS_VARLEN=varlen, DK=Dk, BLOCK_DK=triton.next_power_of_2(Dk),
        N_PAD=triton.next_power_of_2(n), PRECISION=dot_precision(q.dtype), **p)
    return out
