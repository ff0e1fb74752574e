"""Typed arguments of the NSA ops: the eight branch tensors as one tuple, and the kernels' launch options.

Both are plain data (no Triton import), so they are importable on any machine.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import torch


class NSAInputs(NamedTuple):
    """The eight tensors of nsa_attention, in its argument order: `nsa_attention(*inputs, config)`.

    q [B, T, Hq, Dk]; k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] (compressed tokens); k_slc, v_slc, k_swa,
    v_swa [B, T, Hkv, Dk or Dv] (raw tokens of the selection and window branches); gates [B, T, Hq, 3].
    """

    q: torch.Tensor
    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    k_slc: torch.Tensor
    v_slc: torch.Tensor
    k_swa: torch.Tensor
    v_swa: torch.Tensor
    gates: torch.Tensor


@dataclass(frozen=True)
class Launch:
    """Launch settings of one Triton kernel; None keeps the library's choice for the shape at hand.

    block_m, block_n: tile rows (queries or query x head rows) and tile keys of a flash-style kernel;
    block: the key tile of a decoding kernel; num_warps, num_stages (software-pipelining depth) and
    maxnreg (a register cap per thread) are Triton's own launch keywords.
    """

    block_m: int | None = None
    block_n: int | None = None
    block: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    maxnreg: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"Launch.{name} must be None or a positive int, got {value!r}")

    def over(self, defaults: dict, **names: str) -> dict:
        """defaults with the fields that are set replacing them; names maps a field to a kernel's own keyword
        (e.g. block_m="BLOCK_M"); fields a kernel does not take must stay None."""
        out = dict(defaults)
        for field in LAUNCH_FIELDS:  # not asdict(self), which deep-copies: this runs at every kernel launch
            value = getattr(self, field)
            if value is None:
                continue
            key = names.get(field, field)
            if key not in out and field not in ("num_warps", "num_stages", "maxnreg"):
                raise ValueError(f"Launch.{field} is not an option of this kernel (it takes {sorted(defaults)})")
            out[key] = value
        return out


LAUNCH_FIELDS = tuple(f.name for f in fields(Launch))


@dataclass(frozen=True)
class KernelOptions:
    """Tuning of the Triton kernels, passed as `kernel_options=` to nsa_attention / nsa_decode_attention
    (as FlexAttention takes `kernel_options`). The defaults are the library's tuned choices (BENCHMARKS.md);
    every field is an override for benchmarks and sweeps, and no result depends on it.

    banded_*: the compressed and window branches (forward, dk/dv, dq kernels: block_m, block_n, warps, stages).
    selected_*: the selected branch (forward, dq: block_m = at least this many (query, head) rows per program, i.e.
    block_m // G queries walking their blocks' union (unset: 64 rows of at most 16 queries, the tiles whose
    queries share few blocks walked by 16-row tiles instead), block_n keys per tile, warps, stages; dkdv: block_m =
    rows per kv-major program, warps, stages).
    decode_cmp / decode_sparse: the decoding step's key-reading kernels (block = key tile, warps, stages,
    maxnreg); decode_score: its block-score kernel (warps). decode_programs: programs per key-splitting launch
    (None: one per SM). pdl: programmatic dependent launch between the decoding kernels (Hopper and later).
    concurrent_branches: the training op's backward runs the selected branch on a second CUDA stream beside the
    compressed and window branches, the same kernels in the same order of summation, so the results are bitwise those
    of one stream (False); `benchmarks/bench_op.py --streams` times the other setting.
    """

    banded_fwd: Launch = Launch()
    banded_dkdv: Launch = Launch()
    banded_dq: Launch = Launch()
    selected_fwd: Launch = Launch()
    selected_dq: Launch = Launch()
    selected_dkdv: Launch = Launch()
    decode_cmp: Launch = Launch()
    decode_sparse: Launch = Launch()
    decode_score: Launch = Launch()
    decode_programs: int | None = None
    pdl: bool = True
    concurrent_branches: bool = True

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name in ("decode_programs", "pdl", "concurrent_branches"):
                continue
            if not isinstance(getattr(self, name), Launch):
                raise TypeError(f"KernelOptions.{name} must be an nsa.Launch, got {type(getattr(self, name)).__name__}")
        p = self.decode_programs
        if p is not None and (not isinstance(p, int) or isinstance(p, bool) or p < 1):
            raise ValueError(f"KernelOptions.decode_programs must be None or a positive int, got {p!r}")
        for name in ("pdl", "concurrent_branches"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KernelOptions.{name} must be a bool, got {getattr(self, name)!r}")
        # how the options travel to the custom ops (ops/library.py: a string argument, JSON of the fields), made
        # once here so that torch.compile reads an attribute instead of tracing the serialization
        object.__setattr__(self, "op_key", json.dumps(asdict(self), sort_keys=True))

    @classmethod
    def from_op_key(cls, key: str) -> KernelOptions:
        """The inverse of op_key (a JSON object of the fields; Launch fields as objects)."""
        fields = json.loads(key)
        return cls(**{name: Launch(**value) if isinstance(value, dict) else value for name, value in fields.items()})


def check_kernel_options(kernel_options) -> KernelOptions | None:
    """None stays None (the defaults, and nothing to build while tracing); anything but a KernelOptions is refused."""
    if kernel_options is not None and not isinstance(kernel_options, KernelOptions):
        raise TypeError(f"kernel_options must be None or an nsa.KernelOptions, got {type(kernel_options).__name__}")
    return kernel_options
