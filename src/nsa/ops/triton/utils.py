"""Helpers shared by the Triton kernels of NSA: the key-visibility band, sequence bounds, launch sizes.

The band. Key u of a key sequence covers raw positions up to e(u) = u * KEY_STRIDE + KEY_SPAN - 1
(compressed token: stride d, span l; raw key: stride 1, span 1). Query t sees key u iff
    e(u) <= t  and  (WINDOW == 0  or  e(u) > t - WINDOW),
WINDOW == 0 meaning an unbounded window. Every kernel derives its masks and its loop bounds from
the three functions below, so the forward, the backward and the selection agree by construction.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E); the kernels use exp2
LN2 = 0.6931471805599453  # log(x) == log2(x) * LN2
LOG2E_K: tl.constexpr = tl.constexpr(LOG2E)  # the same two constants, usable inside kernels
LN2_K: tl.constexpr = tl.constexpr(LN2)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256  # head dims are padded to a power of two >= 16 in registers; 256 is the largest that fits


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend_inputs(q: torch.Tensor, head_dims) -> None:
    """What every Triton entry needs: CUDA tensors (or the interpreter), a kernel dtype, head dims <= 256."""
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend needs CUDA tensors, got {q.device} "
                         "(or set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU)")
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the triton backend takes float16, bfloat16 or float32 inputs, got {q.dtype}; "
                        "use backend='reference' for float64")
    if q.dtype == torch.bfloat16 and interpreting():
        raise TypeError("Triton's CPU interpreter (TRITON_INTERPRET=1) computes tl.dot on bfloat16 wrongly: use "
                        "float16 or float32 there, or backend='reference'")
    if max(head_dims) > MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims up to {MAX_HEAD_DIM}, got {tuple(head_dims)}")


def _let_interpreter_index_with_numpy_2_4() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and turns them into Python ints with
    int(array), which NumPy >= 2.4 refuses: `range(lo, hi)` with run-time bounds fails inside kernels.
    Re-registers tensor.__index__ through .item() (the same result on older NumPy; skipped on Triton versions
    without this hook)."""
    import triton.runtime.interpreter as interpreter

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None or getattr(patch_lang_tensor, "nsa_patched", False):
        return

    def patch_with_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_with_index.nsa_patched = True
    interpreter._patch_lang_tensor = patch_with_index


if interpreting():
    _let_interpreter_index_with_numpy_2_4()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs are multiplied exactly ("ieee"), not in tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least(x: int, floor: int = 16) -> int:
    """The next power of two >= x, and at least floor (16: tl.dot's smallest tile dim on the GPU)."""
    return max(floor, triton.next_power_of_2(x))


def check_kernel_dtype(*tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 tensors, got {x.dtype}")


def check_pooling(config, dtype: torch.dtype) -> None:
    """pool_probs multiplies by block overlaps (integers up to min(l, l')) in float16 for 16-bit inputs:
    exact only up to 2048."""
    if dtype != torch.float32 and min(config.cmp_block, config.slc_block) > 2048:
        raise ValueError(f"the triton backend pools block scores with float16 weights, exact up to 2048: it needs "
                         f"cmp_block <= 2048 or slc_block <= 2048 for {dtype} inputs, got {config.cmp_block} and "
                         f"{config.slc_block} (float32 inputs have no such limit)")


def check_backward_extras(q, delta, add_dq_to):
    """The optional inputs of a branch backward (delta, add_dq_to) against q [B, T, Hq, Dk]."""
    B, T, Hq, _ = q.shape
    if delta is not None and (tuple(delta.shape) != (B, Hq, T) or delta.dtype != torch.float32
                              or delta.device != q.device):
        raise ValueError(f"delta must be float32 [B, Hq, T] = {[B, Hq, T]} on {q.device}, got {delta.dtype} "
                         f"{list(delta.shape)} on {delta.device}")
    if add_dq_to is not None and (add_dq_to.shape != q.shape or add_dq_to.dtype != q.dtype
                                  or add_dq_to.device != q.device or not add_dq_to.is_contiguous()):
        raise ValueError(f"add_dq_to must be a contiguous tensor like q ({q.dtype} {list(q.shape)} on {q.device}), "
                         f"got {add_dq_to.dtype} {list(add_dq_to.shape)} on {add_dq_to.device}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def row_offsets(b, t, h, stride_b, stride_t, stride_h):
    """Offsets of x[b, t, h, :] in a [B, T, H, D] tensor, int64 (t and h may be vectors: the offsets broadcast)."""
    return b.to(tl.int64) * stride_b + t.to(tl.int64) * stride_t + h.to(tl.int64) * stride_h


@triton.jit
def load_rows(base, rows, row_ok, stride_row, cols, n_cols):
    """x[rows, cols] of a row-strided matrix at base (int64 row offsets): [len(rows), len(cols)], zeros where a
    row is not ok or a column is >= n_cols. The one tile load of every kernel here."""
    ptrs = base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < n_cols)[None, :], other=0.0)


@triton.jit
def softmax_update(m_i, l_i, acc, s, v, PRECISION: tl.constexpr):
    """Online softmax in log2 units: adds scores s [M, N] (-inf where masked) over values v [N, D] to the running
    max m_i, sum l_i = sum 2^(s - m_i) and acc = sum 2^(s - m_i) v. Rows that saw no key yet stay empty, not NaN.
    (The decoding step keeps a tile-relative form of the same update, since it also pools the tile's p.)"""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def key_end(u, KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr):
    """e(u): the last raw position covered by key u."""
    return u * KEY_STRIDE + KEY_SPAN - 1


@triton.jit
def keys_upto(t, KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr):
    """#{u >= 0 : e(u) <= t}, which is also the first key u with e(u) > t."""
    return tl.maximum(t - KEY_SPAN + 1 + KEY_STRIDE, 0) // KEY_STRIDE


@triton.jit
def visible(t, u, KEY_STRIDE: tl.constexpr, KEY_SPAN: tl.constexpr, WINDOW: tl.constexpr):
    """The band: query t sees key u (broadcasting t and u against each other)."""
    e = key_end(u, KEY_STRIDE, KEY_SPAN)
    vis = e <= t
    if WINDOW > 0:
        vis = vis & (e > t - WINDOW)
    return vis


@triton.jit
def seq_bounds(cu_seqlens, b, total, IS_VARLEN: tl.constexpr):
    """(batch index for the pointers, first row, rows) of sequence b.

    Dense batches: batch b, rows [0, total). Packed batches (batch 1): rows [cu[b], cu[b + 1]).
    """
    if IS_VARLEN:
        start = tl.load(cu_seqlens + b)
        length = tl.load(cu_seqlens + b + 1) - start
        batch = b * 0
    else:
        start = b * 0
        length = b * 0 + total
        batch = b
    return batch.to(tl.int64), start.to(tl.int64), length


@triton.jit
def query_offset(q_offsets, b, dense_offset, IS_VARLEN: tl.constexpr):
    """Position of sequence b's first query among its keys: the queries are the last rows of the key sequence
    (FlashAttention's bottom-right causal alignment), so query row r sits at position r + offset.

    Dense batches: dense_offset (Tk - Tq, the same for every row). Packed: q_offsets[b] (int32 [N]).
    """
    if IS_VARLEN:
        offset = tl.load(q_offsets + b)
    else:
        offset = b * 0 + dense_offset
    return offset


def query_offsets(cu_seqlens_q, q_offsets):
    """The int32 [N] query offsets of a packed batch: q_offsets, or zeros (queries and keys of equal lengths)."""
    if cu_seqlens_q is None or q_offsets is not None:
        return q_offsets
    return torch.zeros(cu_seqlens_q.numel() - 1, dtype=torch.int32, device=cu_seqlens_q.device)


@triton.jit
def heaviest_first(pid, programs_per_block, num_blocks, LAST_IS_HEAVIEST: tl.constexpr):
    """(block, program within the block) of flat program id pid in [0, programs_per_block * num_blocks).

    The programs of one block (its heads, or head splits) are adjacent and the blocks come heaviest first, so the
    GPU starts the longest programs first and the short ones fill the tail (causal bands: a late query block sees
    the most keys, an early key block is seen by the most queries); adjacent heads of one GQA group also read the
    same key/value tiles while they are in L2.
    """
    index = pid // programs_per_block
    block = num_blocks - 1 - index if LAST_IS_HEAVIEST else index
    return block, pid % programs_per_block


@triton.jit
def pool_probs(p, w, SPLIT: tl.constexpr):
    """p [rows, tokens] float32 in [0, 1] times the integer weights w [tokens, blocks] -> float32 [rows, blocks].

    SPLIT: as two float16 matmuls, p * 2^14 = hi + lo with hi, lo float16 (22 significant bits, like tf32x3's
    three tf32 matmuls at a third of the tensor-core time; the 2^14 keeps p down to ~1e-9 out of float16's
    subnormals). Otherwise one exact float32 matmul (float32 inputs, the interpreter's tests).
    """
    if SPLIT:
        scaled = p * 16384.0
        hi = scaled.to(tl.float16)
        lo = (scaled - hi.to(tl.float32)).to(tl.float16)
        w16 = w.to(tl.float16)  # integers <= 2048: exact (check_pooling)
        return (tl.dot(hi, w16) + tl.dot(lo, w16)) * (1.0 / 16384.0)
    return tl.dot(p, w, input_precision="ieee")


# Top-n selection on sortable keys: one int64 per candidate block, score bits << 32 | (2^31 - 1 - j), so that one
# max-reduction per round yields both the best score and its block (ties: smaller j), and -1 marks no candidate.


@triton.jit
def block_keys(score, j, candidate, last):
    """Keys of blocks j (scores score >= 0, same shape): the forced blocks J(t) = last, J(t) - 1 and 0 above every
    score, in that order (which matters only if n < 3); then larger score, then smaller j; -1 where not candidate."""
    score = tl.where(score > 0, score, 0.0)  # +0.0, never -0.0: non-negative floats order as their bits
    score = tl.where(j == 0, 1.5e38, score)
    score = tl.where(j == last - 1, 3.0e38, score)
    score = tl.where(j == last, float("inf"), score)
    keys = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - j).to(tl.int64)
    return tl.where(candidate, keys, -1)


@triton.jit
def top_keys(keys, N_SELECT: tl.constexpr, N_PAD: tl.constexpr):
    """Keys [R, K] (distinct within a row; K >= N_PAD, both powers of two) -> [R, N_PAD]: each row's N_SELECT
    largest, descending, then -1.

    Rows of up to 256 keys (the decoding step's chunks): a bitonic top-k (log2(N_PAD) sort stages, then halving
    merges). Longer rows (training, one row per query): N_SELECT rounds of one max-reduction each. On an H100 the
    bitonic top-16 took 55% of the rounds' time on 128 keys and 115% on 1024 (benchmarks/profile_decode.py,
    profile_selection.py). N_PAD = 1 (num_selected = 1) takes the single round too: tl.topk fails on k = 1
    with a [1, K] block (Triton 3.6), and one max is the top-1 anyway.
    """
    slots = tl.arange(0, N_PAD)[None, :]
    if keys.shape[1] <= 256 and N_PAD > 1:
        return tl.where(slots < N_SELECT, tl.topk(keys, N_PAD, dim=1), -1)
    top = tl.full([keys.shape[0], N_PAD], -1, tl.int64)
    for slot in tl.static_range(N_SELECT):
        best = tl.max(keys, 1)[:, None]
        top = tl.where(slots == slot, best, top)
        keys = tl.where(keys == best, -1, keys)
    return top


@triton.jit
def block_ids(top):
    """Keys from top_keys [R, N_PAD] -> block ids int32 [R, N_PAD]: each row ascending, then -1."""
    big = 2147483647
    ids = tl.sort(tl.where(top >= 0, big - (top & 0xFFFFFFFF), big).to(tl.int32), 1)
    return tl.where(ids == big, -1, ids)
