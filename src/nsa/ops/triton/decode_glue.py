"""The decoding step's glue in Triton: what NativeSparseAttention.step does around phi and the attention kernels.

The torch glue (layer.py _project and _compress, cache.py write, completed_blocks and append) issues dozens of small
kernels a layer-step (four rotary embeddings of ~16 each, the ring gather, six cache writes). Here it is two launches
around phi, which stays in torch and runs on fixed shapes every step (no host decision: the step stays capturable).
Row b holds L = cache_seqlens[b] tokens before the step; its S new tokens sit at positions L .. L + S - 1; its
C = ceil(S / d) candidate compressed tokens are i = Tc(L) + c (covering positions [i*d, i*d + l)).

  1. _append_tokens_kernel       grid (S + C, B)
       program s < S, token s: q rotated at p = L + s (into a new tensor); the selection / window keys rotated at p
       and written, with their values, into the token buffers at slot p;
       program S + c, candidate c: its l un-rotated cmp_src keys / values gathered, positions < L from the ring,
       the others from the new tokens (zeros past them: a candidate that completes nothing), into
       k_blocks [B, C, Hkv, l, Dk] / v_blocks [B, C, Hkv, l, Dv] (phi's input).
  2. _append_compressed_kernel   grid (B,)
       after phi: each complete candidate (i*d + l <= L + S) rotated at its block centre i*d + (l - 1) / 2 (keys)
       and stored in slot i of k_cmp / v_cmp (a masked store: the others write nothing); the new tokens' cmp_src
       written to the ring (slot p % R) only now, since launch 1 still read the slots they overwrite; then
       cache_seqlens[b] = L + S (one program a row: it reads the length first and stores it last).

Rotary exactness. The angle is float32(p) * f_c with the cache's float32 frequencies (nsa.rope.inverse_frequencies,
apply_rope's own), cos / sin are libdevice's cosf / sinf on the GPU (what torch's CUDA cos / sin call) and numpy's in
the interpreter, and x1 cos - x2 sin, x2 cos + x1 sin are computed in float32 without FMA contraction
(enable_fp_fusion=False), then rounded to the dtype: apply_rope's operations in its order. On the GPU that is
meant to be bitwise apply_rope (tests/test_decode_glue.py checks it there); numpy's float32 cos / sin differ from
torch's CPU ones by up to one float32 ulp, so in the interpreter rotated values agree to ~1e-7 relative (float32)
or one ulp (float16).

Lengths. A row is in range when 0 <= L and L + S <= capacity (the token buffers' own). Out of range, both kernels
take L = 0 and write nothing into the cache; the step's cache_seqlens[b] still becomes L + S, as the torch glue's
`cache_seqlens += S` does, and nsa_decode_attention then flags the row (NaN outputs, error_flag). Every store and
every load with a computed slot is masked to the buffers' bounds, so no length makes a kernel touch memory outside
its buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .utils import check_backend_inputs, interpreting, load_rows, row_offsets


@triton.jit
def _row_length(CACHE_SEQLENS, b, S, CAPACITY):
    """(length as stored, L, ok): L = the stored length when 0 <= it <= CAPACITY - S (ok), else 0."""
    n = tl.load(CACHE_SEQLENS + b)
    ok = (n >= 0) & (n <= CAPACITY - S)
    return n, tl.where(ok, n, 0), ok


@triton.jit
def _first_candidate(L, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr):
    """Tc(L): the compressed token a row of L tokens completes next."""
    return tl.where(L >= CMP_BLOCK, (L - CMP_BLOCK) // CMP_STRIDE + 1, 0)


@triton.jit
def _cos_sin(position, INV_FREQ, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, LIBDEVICE: tl.constexpr):
    """cos and sin of position (float32) * f_c for c < HALF: [BLOCK_HALF] float32 each."""
    c = tl.arange(0, BLOCK_HALF)
    angle = position * tl.load(INV_FREQ + c, mask=c < HALF, other=0.0)
    if LIBDEVICE:
        return libdevice.cos(angle), libdevice.sin(angle)
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def _rotate(X, x_rows, OUT, out_rows, rows_ok, cos, sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """OUT[out_rows[r], :] = X[x_rows[r], :] rotated (rotate-half convention) by cos, sin, for each row r where
    rows_ok; x_rows, out_rows: int64 element offsets of each row's first element."""
    c = tl.arange(0, BLOCK_HALF)
    mask = rows_ok[:, None] & (c < HALF)[None, :]
    x1 = tl.load(X + x_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_rows[:, None] + HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
    out = OUT + out_rows[:, None] + c[None, :]
    tl.store(out, (x1 * cos[None, :] - x2 * sin[None, :]).to(OUT.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2 * cos[None, :] + x1 * sin[None, :]).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _copy(X, x_rows, OUT, out_rows, rows_ok, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[out_rows[r], :D] = X[x_rows[r], :D] where rows_ok (int64 row offsets, as in _rotate)."""
    d = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (d < D)[None, :]
    x = tl.load(X + x_rows[:, None] + d[None, :], mask=mask)
    tl.store(OUT + out_rows[:, None] + d[None, :], x, mask=mask)


@triton.jit
def _gather_block(RING, stride_ring, slot, from_ring, NEW, stride_new, new, from_new, OUT, out_rows, in_block,
                  D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of one candidate block: OUT[out_rows[j], :D] = RING[slot[j]] where from_ring[j], else NEW[new[j]] where
    from_new[j], else 0 (for j in the block: in_block); RING, NEW: one head's rows, strided by stride_ring /
    stride_new; OUT contiguous rows of D."""
    d = tl.arange(0, BLOCK_D)
    x = tl.where(from_ring[:, None], load_rows(RING, slot, from_ring, stride_ring, d, D),
                 load_rows(NEW, new, from_new, stride_new, d, D))
    tl.store(OUT + out_rows[:, None] * D + d[None, :], x, mask=in_block[:, None] & (d < D)[None, :])


@triton.jit
def _append_tokens_kernel(Q, KV, INV_FREQ, CACHE_SEQLENS, RING_K, RING_V, K_SLC, V_SLC, K_SWA, V_SWA,
                          Q_OUT, K_BLOCKS, V_BLOCKS,
                          stride_qb, stride_qs, stride_qh, stride_kvb, stride_kvs, stride_kvset, stride_kvh,
                          stride_rkb, stride_rkt, stride_rkh, stride_rvb, stride_rvt, stride_rvh,
                          stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                          S, C, CAPACITY, RING,
                          HQ: tl.constexpr, HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          SHARE_KV: tl.constexpr, CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
                          BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_L: tl.constexpr,
                          LIBDEVICE: tl.constexpr):
    """Launch 1 (module docstring). Q [B, S, HQ, DK] (q_proj's output), KV [B, S, sets, HKV, DK + DV] (kv_proj's:
    set 0 the cmp_src, sets 1 and 2 the selection and window keys/values; one set with SHARE_KV), ring and token
    buffers [B, T, HKV, D] (K_SWA, V_SWA unused with SHARE_KV); Q_OUT [B, S, HQ, DK], K_BLOCKS [B, C, HKV, l, DK],
    V_BLOCKS [B, C, HKV, l, DV] contiguous."""
    HALF: tl.constexpr = DK // 2
    item, b = tl.program_id(0), tl.program_id(1)
    _, L, ok = _row_length(CACHE_SEQLENS, b, S, CAPACITY)
    if item < S:
        s = item
        p = L + s
        cos, sin = _cos_sin(p.to(tl.float32), INV_FREQ, HALF, BLOCK_HALF, LIBDEVICE)
        for h0 in range(0, HQ, BLOCK_HQ):
            h = h0 + tl.arange(0, BLOCK_HQ)
            out = ((b.to(tl.int64) * S + s) * HQ + h) * DK
            _rotate(Q, row_offsets(b, s, h, stride_qb, stride_qs, stride_qh), Q_OUT, out, h < HQ, cos, sin, HALF,
                    BLOCK_HALF)
        h = tl.arange(0, BLOCK_HKV)
        write = ok & (h < HKV)  # nothing into the cache for a row out of range
        slc = row_offsets(b, s, h, stride_kvb, stride_kvs, stride_kvh)  # set 0 with SHARE_KV, else set 1
        if not SHARE_KV:
            slc += stride_kvset
        _rotate(KV, slc, K_SLC, row_offsets(b, p, h, stride_kb, stride_kt, stride_kh), write, cos, sin, HALF,
                BLOCK_HALF)
        _copy(KV + DK, slc, V_SLC, row_offsets(b, p, h, stride_vb, stride_vt, stride_vh), write, DV, BLOCK_DV)
        if not SHARE_KV:
            swa = slc + stride_kvset
            _rotate(KV, swa, K_SWA, row_offsets(b, p, h, stride_kb, stride_kt, stride_kh), write, cos, sin, HALF,
                    BLOCK_HALF)
            _copy(KV + DK, swa, V_SWA, row_offsets(b, p, h, stride_vb, stride_vt, stride_vh), write, DV, BLOCK_DV)
    else:
        c = item - S
        start = (_first_candidate(L, CMP_STRIDE, CMP_BLOCK) + c) * CMP_STRIDE
        block = (b * C + c).to(tl.int64) * HKV
        for j0 in range(0, CMP_BLOCK, BLOCK_L):
            j = j0 + tl.arange(0, BLOCK_L)
            u = start + j  # positions >= 0
            in_block = j < CMP_BLOCK
            from_ring = in_block & (u < L)
            from_new = in_block & (u >= L) & (u < L + S)
            slot = u % RING
            new = tl.where(from_new, u - L, 0)
            for h in range(HKV):
                out = (block + h) * CMP_BLOCK + j
                new_k = KV + b.to(tl.int64) * stride_kvb + h * stride_kvh  # set 0: the cmp_src
                _gather_block(RING_K + b.to(tl.int64) * stride_rkb + h * stride_rkh, stride_rkt, slot, from_ring,
                              new_k, stride_kvs, new, from_new, K_BLOCKS, out, in_block, DK, BLOCK_DK)
                _gather_block(RING_V + b.to(tl.int64) * stride_rvb + h * stride_rvh, stride_rvt, slot, from_ring,
                              new_k + DK, stride_kvs, new, from_new, V_BLOCKS, out, in_block, DV, BLOCK_DV)


@triton.jit
def _append_compressed_kernel(K_NEW, V_NEW, KV, INV_FREQ, CACHE_SEQLENS, RING_K, RING_V, K_CMP, V_CMP,
                              stride_kvb, stride_kvs, stride_kvh,
                              stride_rkb, stride_rkt, stride_rkh, stride_rvb, stride_rvt, stride_rvh,
                              stride_ckb, stride_ckt, stride_ckh, stride_cvb, stride_cvt, stride_cvh,
                              S, C, CAPACITY, RING, CMP_SLOTS,
                              HKV: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                              CMP_STRIDE: tl.constexpr, CMP_BLOCK: tl.constexpr,
                              BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_DK: tl.constexpr,
                              BLOCK_DV: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Launch 2 (module docstring). K_NEW [B, C, HKV, DK], V_NEW [B, C, HKV, DV] (phi's outputs, contiguous), KV as
    in launch 1, ring buffers [B, RING, HKV, D], K_CMP, V_CMP [B, CMP_SLOTS, HKV, D]."""
    HALF: tl.constexpr = DK // 2
    b = tl.program_id(0)
    stored, L, ok = _row_length(CACHE_SEQLENS, b, S, CAPACITY)
    h = tl.arange(0, BLOCK_HKV)
    heads = ok & (h < HKV)
    first = _first_candidate(L, CMP_STRIDE, CMP_BLOCK)
    for c in range(C):
        i = first + c
        complete = heads & (i * CMP_STRIDE + CMP_BLOCK <= L + S) & (i < CMP_SLOTS)
        centre = (i * CMP_STRIDE).to(tl.float32) + (CMP_BLOCK - 1) / 2
        cos, sin = _cos_sin(centre, INV_FREQ, HALF, BLOCK_HALF, LIBDEVICE)
        row = (b * C + c).to(tl.int64) * HKV + h
        _rotate(K_NEW, row * DK, K_CMP, row_offsets(b, i, h, stride_ckb, stride_ckt, stride_ckh), complete, cos, sin,
                HALF, BLOCK_HALF)
        _copy(V_NEW, row * DV, V_CMP, row_offsets(b, i, h, stride_cvb, stride_cvt, stride_cvh), complete, DV, BLOCK_DV)
    for s in range(tl.maximum(S - RING, 0), S):  # only the last RING tokens' cmp_src can be needed again
        slot = (L + s) % RING
        src = row_offsets(b, h * 0 + s, h, stride_kvb, stride_kvs, stride_kvh)  # set 0: the cmp_src
        _copy(KV, src, RING_K, row_offsets(b, slot, h, stride_rkb, stride_rkt, stride_rkh), heads, DK, BLOCK_DK)
        _copy(KV + DK, src, RING_V, row_offsets(b, slot, h, stride_rvb, stride_rvt, stride_rvh), heads, DV, BLOCK_DV)
    tl.debug_barrier()  # every thread of the program has read the length before it moves
    tl.store(CACHE_SEQLENS + b, stored + S)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _check(head_dims: tuple[int, int], tensors: tuple) -> None:
    """What the kernels need: a Triton device and dtype, head dims (Dk, Dv) <= 256, contiguous last dims."""
    check_backend_inputs(tensors[0], head_dims)
    if any(x.stride(-1) != 1 for x in tensors):
        raise ValueError("the fused decoding glue needs tensors whose last dim is contiguous")


def _pow2(x: int) -> int:
    return triton.next_power_of_2(x)


def append_tokens(q, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_slc, v_slc, k_swa, v_swa, cmp_block: int,
                  cmp_stride: int):
    """Launch 1: q [B, S, Hq, Dk] and kv [B, S, sets, Hkv, Dk + Dv] (the layer's projections, sets 1 with share_kv
    (k_swa, v_swa None) else 3), inv_freq float32 [Dk/2], the cache's lengths, ring and token buffers ->
    (q rotated [B, S, Hq, Dk], k_blocks [B, C, Hkv, l, Dk], v_blocks [B, C, Hkv, l, Dv]); writes the token buffers."""
    B, S, Hq, Dk = q.shape
    Hkv, Dv = kv.shape[3], v_slc.shape[3]
    share_kv = kv.shape[2] == 1
    _check((Dk, Dv), (kv, q, ring_k, ring_v, k_slc, v_slc) + (() if share_kv else (k_swa, v_swa)))
    C = triton.cdiv(S, cmp_stride)
    q_out = torch.empty(B, S, Hq, Dk, dtype=q.dtype, device=q.device)
    k_blocks = torch.empty(B, C, Hkv, cmp_block, Dk, dtype=kv.dtype, device=kv.device)
    v_blocks = torch.empty(B, C, Hkv, cmp_block, Dv, dtype=kv.dtype, device=kv.device)
    k_swa, v_swa = (k_slc, v_slc) if share_kv else (k_swa, v_swa)
    if (k_swa.stride(), v_swa.stride()) != (k_slc.stride(), v_slc.stride()):
        raise ValueError("the fused decoding glue needs the window buffers laid out as the selection buffers")
    _append_tokens_kernel[(S + C, B)](
        q, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_slc, v_slc, k_swa, v_swa, q_out, k_blocks, v_blocks,
        *_strides(q), *kv.stride()[:4], *_strides(ring_k), *_strides(ring_v), *_strides(k_slc), *_strides(v_slc),
        S, C, k_slc.shape[1], ring_k.shape[1],
        HQ=Hq, HKV=Hkv, DK=Dk, DV=Dv, SHARE_KV=share_kv, CMP_STRIDE=cmp_stride, CMP_BLOCK=cmp_block,
        BLOCK_HQ=min(_pow2(Hq), 16), BLOCK_HKV=_pow2(Hkv), BLOCK_HALF=_pow2(Dk // 2), BLOCK_DK=_pow2(Dk),
        BLOCK_DV=_pow2(Dv), BLOCK_L=min(_pow2(cmp_block), 32), LIBDEVICE=not interpreting(),
        enable_fp_fusion=False)
    return q_out, k_blocks, v_blocks


def append_compressed(k_new, v_new, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_cmp, v_cmp, capacity: int,
                      cmp_block: int, cmp_stride: int) -> None:
    """Launch 2: phi's outputs k_new [B, C, Hkv, Dk], v_new [B, C, Hkv, Dv] (un-rotated) into the compressed buffers
    k_cmp, v_cmp [B, cmp_capacity, Hkv, D] where complete, the new tokens' cmp_src (kv's set 0) into the ring,
    then cache_seqlens += S; capacity: the token buffers' (a row's bound)."""
    B, S, _, Hkv, _ = kv.shape
    C, Dk, Dv = k_new.shape[1], k_new.shape[3], v_new.shape[3]
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    _check((Dk, Dv), (kv, ring_k, ring_v, k_cmp, v_cmp))
    _append_compressed_kernel[(B,)](
        k_new, v_new, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_cmp, v_cmp,
        kv.stride(0), kv.stride(1), kv.stride(3), *_strides(ring_k), *_strides(ring_v), *_strides(k_cmp),
        *_strides(v_cmp), S, C, capacity, ring_k.shape[1], k_cmp.shape[1],
        HKV=Hkv, DK=Dk, DV=Dv, CMP_STRIDE=cmp_stride, CMP_BLOCK=cmp_block, BLOCK_HKV=_pow2(Hkv),
        BLOCK_HALF=_pow2(Dk // 2), BLOCK_DK=_pow2(Dk), BLOCK_DV=_pow2(Dv), LIBDEVICE=not interpreting(),
        enable_fp_fusion=False)
