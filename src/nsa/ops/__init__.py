"""The NSA op: one public entry per job, dispatching to a backend after checking the inputs.

Backends:
  "reference": plain PyTorch (ops/reference.py); exact in float64, runs anywhere, slow.
  "triton":    the fused kernels (ops/triton/); CUDA tensors only.
backend=None picks "triton" for CUDA tensors when Triton is importable, else "reference".

Every entry calls a custom op of ops/library.py (nsa::attention, nsa::select_blocks, nsa::decode_attention), so
torch.compile sees one opaque node per call. What is read on the host, and so what torch.compile can trace:
  dense inputs (cu_seqlens=None): shapes only, nothing read from the device: traces with fullgraph=True;
  cu_seqlens: checked and turned into the packed lengths with one cu_seqlens.tolist() (the reference splits the
      batch with them, the Triton kernels size their grids with them): a graph break under torch.compile, so
      fullgraph=True refuses packed batches (compile without it, or keep packing out of the compiled region);
  nsa_decode_attention: host_seqlens is checked eagerly, skipped while compiling (guarding on its values would
      recompile every step); the Triton kernels then guard the rows on the device (NaN, error_flag) and the
      reference op reads and checks cache_seqlens inside itself.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

from ..config import NSAConfig
from . import library
from .checks import (check_attention_inputs, check_decode_inputs, check_decode_lengths, check_host_seqlens,
                     check_scale, check_select_inputs)
from .types import KernelOptions, Launch, NSAInputs, check_kernel_options

__all__ = ["nsa_attention", "select_blocks", "nsa_decode_attention", "KernelOptions", "Launch", "NSAInputs"]

BACKENDS = ("reference", "triton")


# Read once at import (without importing triton): the backend choice then reads a bool, which torch.compile traces
# (torch 2.11's Dynamo refuses importlib.util.find_spec under fullgraph, which a cached call of it reached).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _warn_slow_fallback(reason: str) -> None:
    warnings.warn(f"nsa: {reason}; using the PyTorch reference backend, which is far slower "
                  "(orders of magnitude at long T)", stacklevel=4)


def _resolve_backend(backend, device: torch.device) -> str:
    if backend is None:
        if device.type != "cuda":
            return "reference"
        if not TRITON_AVAILABLE:
            _warn_slow_fallback("CUDA tensors but Triton is not installed")
            return "reference"
        return "triton"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend='triton' needs CUDA tensors, got {device}; use backend='reference' on the CPU "
                         "(or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")
    return backend


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 (read here without importing triton, which the reference backend does not need)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config: NSAConfig = NSAConfig(), *,
                  scale=None, cu_seqlens=None, backend=None, kernel_options: KernelOptions | None = None,
                  cu_seqlens_k=None):
    """Native Sparse Attention (SPEC.md).

    q [B, T, Hq, Dk]; k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv] (compressed tokens);
    k_slc, v_slc, k_swa, v_swa [B, Tk, Hkv, Dk or Dv]; gates [B, T, Hq, 3] in (0, 1), order (cmp, slc, swa).
    Suffix queries: Tk >= T keys, the queries being the last T positions of the keys' sequence (FlashAttention's
    bottom-right causal alignment; Tc counts the compressed tokens of the Tk keys): what a context-parallel rank
    computes for its query chunk against the gathered keys. Tk = T is the whole sequence.
    cu_seqlens: int32 [N + 1] for packed sequences ([1, total, H, D] inputs, k_cmp packed per sequence);
    cu_seqlens_k: int32 [N + 1], the keys' offsets when they are longer than the queries (None: cu_seqlens).
    kernel_options: an nsa.KernelOptions tuning the Triton kernels (None: the library's choices).
    Returns o [B, T, Hq, Dv] in q's dtype.
    """
    seq_lens, seq_lens_k = check_attention_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config,
                                                  cu_seqlens, cu_seqlens_k)
    scale = check_scale(scale, q.shape[-1])
    options = check_kernel_options(kernel_options)
    backend = _resolve_backend(backend, q.device)
    return library.nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, backend,
                                 cu_seqlens, seq_lens, options, cu_seqlens_k, seq_lens_k)


def select_blocks(q, k_cmp, config: NSAConfig = NSAConfig(), *, scale=None, cu_seqlens=None, backend=None,
                  kernel_options: KernelOptions | None = None):
    """Top-n selection blocks of each query's GQA group (SPEC.md, branch 2).

    q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] -> long [B, T, Hkv, n]: ids ascending, then -1 in unused slots.
    """
    seq_lens = check_select_inputs(q, k_cmp, config, cu_seqlens)
    scale = check_scale(scale, q.shape[-1])
    options = check_kernel_options(kernel_options)
    backend = _resolve_backend(backend, q.device)
    return library.nsa_select_blocks(q, k_cmp, config, scale, backend, cu_seqlens, seq_lens, options)


def nsa_decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens,
                         config: NSAConfig = NSAConfig(), *, scale=None, backend=None,
                         host_seqlens: list[int] | None = None, error_flag: torch.Tensor | None = None,
                         kernel_options: KernelOptions | None = None):
    """One decoding step: the S newest tokens of each batch row attend through a KV cache.

    q [B, S, Hq, Dk], gates [B, S, Hq, 3] for the new tokens (S = 1, or a few for speculative decoding);
    cache buffers k_slc, v_slc, k_swa, v_swa [B, capacity, Hkv, Dk or Dv] and k_cmp, v_cmp
    [B, capacity_cmp, Hkv, Dk or Dv]; cache_seqlens int32 [B]: raw tokens row b holds, the S new ones included
    (already written to the buffers), so its queries sit at positions cache_seqlens[b] - S .. cache_seqlens[b] - 1.
    Row b's compressed tokens are its first num_cmp_tokens(cache_seqlens[b]) slots of k_cmp / v_cmp.
    Returns o [B, S, Hq, Dv]: the same as nsa_attention over the whole sequence, at those positions.

    Lengths. A row is in range when S <= L <= capacity and num_cmp_tokens(L) <= capacity_cmp (L = its length).
    host_seqlens: the host copy of cache_seqlens (B ints; the caches keep one), checked instead of reading the
    device (which would wait for it). Without it, cache_seqlens is read once (.tolist()) and checked, except
    while a CUDA graph is being captured. An out-of-range row raises ValueError naming the row. Where nothing
    was checked on the host (capture; replays of it), the Triton kernels still read and write only inside the
    buffers: an out-of-range row's outputs are NaN and error_flag (int32 [1] on q's device, if given) is set
    to 1; it is never cleared here, so zero it, replay, then read it once.
    """
    check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config, error_flag)
    scale = check_scale(scale, q.shape[-1])
    options = check_kernel_options(kernel_options)
    S, capacity, cmp_capacity = q.shape[1], k_slc.shape[1], k_cmp.shape[1]
    backend = _resolve_backend(backend, q.device)
    if torch.compiler.is_compiling():
        # traced: no host value is read here (host_seqlens would be guarded on, cache_seqlens.tolist() is a sync);
        # the Triton kernels' guard (NaN rows, error_flag) holds, the reference op reads and checks cache_seqlens
        lengths = None
    elif host_seqlens is not None:
        lengths = check_host_seqlens(host_seqlens, q.shape[0])
        check_decode_lengths(lengths, S, capacity, cmp_capacity, config, name="host_seqlens")
    elif not _capturing(q.device):
        lengths = cache_seqlens.tolist()
        check_decode_lengths(lengths, S, capacity, cmp_capacity, config)
    else:
        lengths = None  # no host read during capture: the kernels' guard (NaN rows, error_flag) is all there is
        if backend == "reference":
            raise ValueError("the reference backend reads the lengths on the host: pass host_seqlens to capture "
                             "nsa_decode_attention with backend='reference' in a CUDA graph")
    return library.nsa_decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config,
                                        scale, backend, lengths if backend == "reference" else None, error_flag,
                                        options)


def decode_glue_fused(backend, device: torch.device) -> bool:
    """Whether a layer's decoding step on `device` runs its glue (rotary embeddings, cache writes, the candidate
    blocks' gather) as the Triton kernels of ops/triton/decode_glue.py: when nsa_decode_attention runs the Triton
    backend (backend, or None's choice for the device); with the reference backend the layer keeps its torch glue."""
    return _resolve_backend(backend, device) == "triton"


def _capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream (never on the CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()
