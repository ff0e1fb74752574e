"""NSAConfig: the block parameters of Native Sparse Attention (SPEC.md, "Notation")."""
from __future__ import annotations

import numbers
from dataclasses import dataclass

INT32_LIMIT = 2 ** 31  # the kernels index tokens and blocks in int32


@dataclass(frozen=True)
class NSAConfig:
    """Block parameters of NSA. The defaults are the paper's.

    cmp_block (l): raw tokens summarized by one compressed token.
    cmp_stride (d): distance between the starts of consecutive compressed tokens.
    slc_block (l'): raw tokens in one selection block.
    num_selected (n): selection blocks each query attends to, forced blocks included
        (block 0 and the two local blocks; if n < 3 they are kept in the order J(t), J(t) - 1, 0).
    window (w): sliding-window length, the query itself included.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    num_selected: int = 16
    window: int = 512

    def __post_init__(self) -> None:
        for name in ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NSAConfig.{name} must be a positive int, got {value!r}")
            if value >= INT32_LIMIT:
                raise ValueError(f"NSAConfig.{name} must be < 2**31 (the kernels index in int32), got {value}")
            object.__setattr__(self, name, int(value))  # numpy ints become Python ints (the config is frozen)
        l, d, lp = self.cmp_block, self.cmp_stride, self.slc_block
        if l < d:
            raise ValueError(
                f"NSAConfig: cmp_block ({l}) must be >= cmp_stride ({d}), "
                "otherwise raw tokens between compressed blocks are never summarized")
        if l % d:
            raise ValueError(f"NSAConfig: cmp_stride ({d}) must divide cmp_block ({l})")
        if lp % d:
            raise ValueError(f"NSAConfig: cmp_stride ({d}) must divide slc_block ({lp})")

    def num_cmp_tokens(self, seq_len: int) -> int:
        """Tc: compressed tokens of a sequence of `seq_len` raw tokens."""
        if seq_len < self.cmp_block:
            return 0
        return (seq_len - self.cmp_block) // self.cmp_stride + 1

    def num_slc_blocks(self, seq_len: int) -> int:
        """Selection blocks covering a sequence of `seq_len` raw tokens (the last may be partial)."""
        return -(-seq_len // self.slc_block)
