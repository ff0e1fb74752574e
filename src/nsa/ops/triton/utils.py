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


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 inputs are multiplied exactly ("ieee"), not in tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2_at_least(x: int, floor: int = 16) -> int:
    """The next power of two >= x, and at least floor (16: tl.dot's smallest tile dim on the GPU)."""
    return max(floor, triton.next_power_of_2(x))


def check_kernel_dtype(*tensors: torch.Tensor) -> None:
    for x in tensors:
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the Triton kernels take float16, bfloat16 or float32 tensors, got {x.dtype}")


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


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
