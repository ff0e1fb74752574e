"""Rotary position embedding (RoPE), rotate-half convention, at explicit (possibly fractional) positions.

Channel pair (c, c + D/2) of a head vector is rotated by the angle p * base ** (-2c / D) at position p,
so q(t) . k(u) depends on the positions only through t - u. Positions are passed explicitly and
may be fractional, which lets a compressed token sit at the centre of the block it summarizes.
"""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (x1, x2 its two halves)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotates x [B, T, H, D] (D even) by its positions: [T] (shared by the batch) or [B, T], int or float.

    out = x * cos(p * f) + rotate_half(x) * sin(p * f), f = base ** (-2c / D) for c < D/2, repeated
    for both halves. The angles are computed in float32 (float64 for float64 x) and the result has x's dtype.
    """
    return rotate(x, *rope_cos_sin(positions, x.shape[-1], base, x.dtype))


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [(B,) T, 1, D] of the angles p * f at positions [T] or [B, T], for rotating tensors of `dtype`
    (computed in float64 for float64, else float32): computed once, they rotate every tensor at those positions."""
    if head_dim % 2:
        raise ValueError(f"apply_rope needs an even head dim, got {head_dim}")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    inv_freq = inverse_frequencies(head_dim, base, positions.device, ct)  # [D/2]
    angles = positions.to(ct)[..., None] * inv_freq  # [(B,) T, D/2]
    angles = torch.cat((angles, angles), dim=-1)[..., None, :]  # [(B,) T, 1, D]: broadcast over heads
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by rope_cos_sin's (cos, sin), computed in their dtype, returned in x's."""
    xc = x.to(cos.dtype)
    return (xc * cos + rotate_half(xc) * sin).to(x.dtype)


def inverse_frequencies(head_dim: int, base: float, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """f = base ** (-2c / D) for c < D/2: [D/2] in dtype (apply_rope's float32 for every kernel dtype). The decoding
    caches keep the float32 ones, so the fused decoding step (ops/triton/decode_glue.py) rotates with the same f."""
    return base ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Positions of a packed batch, restarting at 0 in every sequence: cu_seqlens [N + 1] -> long [total].

    Example: cu_seqlens [0, 3, 5] -> [0, 1, 2, 0, 1].
    """
    cu = cu_seqlens.long()
    total = int(cu[-1])
    index = torch.arange(total, device=cu.device)
    seq_start = cu[torch.searchsorted(cu, index, right=True) - 1]  # start of the sequence holding each token
    return index - seq_start
