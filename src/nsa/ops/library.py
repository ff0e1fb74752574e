"""The NSA ops as PyTorch custom ops (namespace nsa::), so that torch.compile traces through them.

  torch.ops.nsa.attention           the training op's forward: o and what its backward needs
  torch.ops.nsa.attention_backward  the gradients of its eight inputs
  torch.ops.nsa.select_blocks       the top-n block ids
  torch.ops.nsa.decode_attention    one decoding step over a KV cache (mutates error_flag)
  torch.ops.nsa.decode_append_tokens, decode_append_compressed
                                    the decoding step's glue around phi (Triton only; they write the cache)

Each has a fake implementation (shapes and dtypes only), so torch.compile / torch.export see an opaque node;
nsa::attention has its autograd registered (its backward calls nsa::attention_backward). The public entries
(nsa.nsa_attention, nsa.select_blocks, nsa.nsa_decode_attention, ops/__init__.py) validate their inputs and call
these ops through the helpers at the end of this file; they are the supported API, the ops are their plumbing.

Custom ops take only tensors and plain scalars, so:
  config          travels as its five ints (cmp_block, cmp_stride, slc_block, num_selected, window);
  backend         as its name ("reference" or "triton"), already resolved;
  kernel_options  as a string: "" for None (the defaults), else the KernelOptions' fields as JSON (parsed back once,
                  cached);
  cu_seqlens      as an optional tensor, with seq_lens (the packed lengths, host ints) beside it: the Triton
                  kernels size their grids from them (see ops/__init__.py for what this means under compile);
  cu_seqlens_k    likewise with seq_lens_k, the keys' offsets and lengths of suffix queries (None: those of q).
Backward of the reference backend: nsa::attention_backward recomputes the reference forward under autograd and
differentiates it (torch.autograd.grad; see _autograd_on), so the reference's backward costs one more forward (it is a yardstick);
the reference's outputs are made contiguous (as the fakes say; the reference's own layout is transposed). The
Triton backend saves the branch outputs, their lses and the block ids (as its own Function did) and runs its
kernels' backward.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
from torch import Tensor

from ..config import NSAConfig
from . import reference
from .types import KernelOptions

CONFIG_FIELDS = ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window")


def config_ints(config: NSAConfig) -> tuple[int, int, int, int, int]:
    return tuple(getattr(config, name) for name in CONFIG_FIELDS)


def options_key(options: KernelOptions | None) -> str:
    """A KernelOptions as a custom op's string argument ("" for None: the defaults)."""
    return "" if options is None else options.op_key


@functools.lru_cache(maxsize=64)
def _options(key: str) -> KernelOptions:
    if not key:
        return KernelOptions()
    return KernelOptions.from_op_key(key)


def _config(cmp_block, cmp_stride, slc_block, num_selected, window) -> NSAConfig:
    return NSAConfig(cmp_block, cmp_stride, slc_block, num_selected, window)


# --- the training op --------------------------------------------------------------------------------------------

@torch.library.custom_op("nsa::attention", mutates_args=())
def attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_swa: Tensor, v_swa: Tensor,
              gates: Tensor, cmp_block: int, cmp_stride: int, slc_block: int, num_selected: int, window: int,
              scale: float, backend: str, options: str, cu_seqlens: Optional[Tensor],
              seq_lens: Optional[list[int]], cu_seqlens_k: Optional[Tensor] = None,
              seq_lens_k: Optional[list[int]] = None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(o [B, T, Hq, Dv], o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, block_ids): the last seven are what the
    Triton backward needs (empty tensors for the reference, whose backward recomputes)."""
    config = _config(cmp_block, cmp_stride, slc_block, num_selected, window)
    if backend == "triton":
        from .triton import nsa_attention_fwd
        return nsa_attention_fwd(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale,
                                 cu_seqlens=cu_seqlens, seq_lens=seq_lens, cu_seqlens_k=cu_seqlens_k,
                                 seq_lens_k=seq_lens_k, kernel_options=_options(options))
    o = reference.nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, scale, seq_lens=seq_lens,
                                seq_lens_k=seq_lens_k)
    return (o.contiguous(),) + tuple(q.new_empty(0) for _ in range(7))


@attention.register_fake
def _attention_fake(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cmp_block, cmp_stride, slc_block,
                    num_selected, window, scale, backend, options, cu_seqlens, seq_lens, cu_seqlens_k=None,
                    seq_lens_k=None):
    B, T, Hq, _ = q.shape
    Hkv, Dv = k_cmp.shape[2], v_cmp.shape[3]
    o = q.new_empty(B, T, Hq, Dv)
    if backend != "triton":
        return (o,) + tuple(q.new_empty(0) for _ in range(7))
    lse = [q.new_empty(B, Hq, T, dtype=torch.float32) for _ in range(3)]
    ids = q.new_empty(B, T, Hkv, num_selected, dtype=torch.int32)
    return (o, q.new_empty(B, T, Hq, Dv), q.new_empty(B, T, Hq, Dv), q.new_empty(B, T, Hq, Dv), *lse, ids)


@torch.library.custom_op("nsa::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor,
                       k_swa: Tensor, v_swa: Tensor, gates: Tensor, o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor,
                       lse_cmp: Tensor, lse_slc: Tensor, lse_swa: Tensor, block_ids: Tensor, cmp_block: int,
                       cmp_stride: int, slc_block: int, num_selected: int, window: int, scale: float, backend: str,
                       options: str, cu_seqlens: Optional[Tensor], seq_lens: Optional[list[int]],
                       cu_seqlens_k: Optional[Tensor] = None, seq_lens_k: Optional[list[int]] = None
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk_cmp, dv_cmp, dk_slc, dv_slc, dk_swa, dv_swa, dgates) from do [B, T, Hq, Dv]."""
    config = _config(cmp_block, cmp_stride, slc_block, num_selected, window)
    inputs = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)
    if backend == "triton":
        from .triton import nsa_attention_bwd
        return nsa_attention_bwd(do, *inputs, o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, block_ids, config,
                                 scale, cu_seqlens=cu_seqlens, seq_lens=seq_lens, cu_seqlens_k=cu_seqlens_k,
                                 seq_lens_k=seq_lens_k, kernel_options=_options(options))
    with _autograd_on():  # the reference: recompute the forward under autograd, differentiate it
        leaves = [x.detach().requires_grad_() for x in inputs]
        o = reference.nsa_attention(*leaves, config, scale, seq_lens=seq_lens, seq_lens_k=seq_lens_k)
        grads = torch.autograd.grad(o, leaves, do, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g.contiguous() for g, x in zip(grads, inputs))


_AUTOGRAD_KEYS = ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")


@contextlib.contextmanager
def _autograd_on():
    """Autograd back on inside a custom op's implementation, which runs with the autograd dispatch keys excluded
    (torch.library's autograd wrapper, like torch.autograd.Function.forward): grad mode alone does not record.
    torch.func.vjp would do without this private guard, but its wrapper tensors break opcheck's cross-checking
    modes; torch's own wrappers (torch/_higher_order_ops) use the same guard."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        key = getattr(torch._C.DispatchKey, name, None)
        if key is not None:
            exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


@attention_backward.register_fake
def _attention_backward_fake(do, q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, *rest):
    return tuple(torch.empty_like(x) for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates))


_PARAMS = ("cmp_block", "cmp_stride", "slc_block", "num_selected", "window", "scale", "backend", "options",
           "cu_seqlens", "seq_lens", "cu_seqlens_k", "seq_lens_k")


def _attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8], *output[1:])
    ctx.params = inputs[8:]


def _attention_autograd(ctx, do, *unused):
    saved = ctx.saved_tensors
    if do is None:
        do = saved[0].new_zeros(*saved[0].shape[:3], saved[2].shape[3])  # o unused: only aux outputs reached
    grads = torch.ops.nsa.attention_backward(do, *saved, *ctx.params)
    return tuple(grads) + (None,) * len(_PARAMS)


attention.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


# --- selection and decoding ------------------------------------------------------------------------------------

@torch.library.custom_op("nsa::select_blocks", mutates_args=())
def select_blocks(q: Tensor, k_cmp: Tensor, cmp_block: int, cmp_stride: int, slc_block: int, num_selected: int,
                  window: int, scale: float, backend: str, options: str, cu_seqlens: Optional[Tensor],
                  seq_lens: Optional[list[int]]) -> Tensor:
    """long [B, T, Hkv, n]: each query's selected blocks, ascending, then -1."""
    config = _config(cmp_block, cmp_stride, slc_block, num_selected, window)
    if backend == "triton":
        from .triton import select_blocks as triton_select_blocks
        return triton_select_blocks(q, k_cmp, config, scale, cu_seqlens=cu_seqlens, seq_lens=seq_lens,
                                    kernel_options=_options(options))
    return reference.select_blocks(q, k_cmp, config, scale, seq_lens=seq_lens).contiguous()


@select_blocks.register_fake
def _select_blocks_fake(q, k_cmp, cmp_block, cmp_stride, slc_block, num_selected, *rest):
    return q.new_empty(q.shape[0], q.shape[1], k_cmp.shape[2], num_selected, dtype=torch.long)


@torch.library.custom_op("nsa::decode_attention", mutates_args=("error_flag",))
def decode_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, k_slc: Tensor, v_slc: Tensor, k_swa: Tensor,
                     v_swa: Tensor, gates: Tensor, cache_seqlens: Tensor, cmp_block: int, cmp_stride: int,
                     slc_block: int, num_selected: int, window: int, scale: float, backend: str, options: str,
                     host_seqlens: Optional[list[int]], error_flag: Optional[Tensor]) -> Tensor:
    """o [B, S, Hq, Dv] of the S newest tokens of each row. The Triton kernels never read cache_seqlens on the host;
    the reference reads host_seqlens, or (None: under torch.compile) cache_seqlens once, and checks them."""
    config = _config(cmp_block, cmp_stride, slc_block, num_selected, window)
    if backend == "triton":
        from .triton import nsa_decode_attention as triton_decode
        return triton_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config, scale,
                             error_flag=error_flag, kernel_options=_options(options))
    if host_seqlens is None:
        from .checks import check_decode_lengths
        host_seqlens = cache_seqlens.tolist()
        check_decode_lengths(host_seqlens, q.shape[1], k_slc.shape[1], k_cmp.shape[1], config)
    return reference.nsa_decode(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, host_seqlens, config,
                                scale).contiguous()


@decode_attention.register_fake
def _decode_attention_fake(q, k_cmp, v_cmp, *rest):
    return q.new_empty(*q.shape[:3], v_cmp.shape[3])


# --- the decoding step's glue (Triton only: the reference path is the layer's torch glue) ----------------------

@torch.library.custom_op("nsa::decode_append_tokens", mutates_args=("k_slc", "v_slc", "k_swa", "v_swa"))
def decode_append_tokens(q: Tensor, kv: Tensor, inv_freq: Tensor, cache_seqlens: Tensor, ring_k: Tensor,
                         ring_v: Tensor, k_slc: Tensor, v_slc: Tensor, k_swa: Optional[Tensor],
                         v_swa: Optional[Tensor], cmp_block: int, cmp_stride: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q rotated [B, S, Hq, Dk], k_blocks [B, C, Hkv, l, Dk], v_blocks [B, C, Hkv, l, Dv]); writes the new tokens
    into the token buffers (ops/triton/decode_glue.py, launch 1)."""
    from .triton.decode_glue import append_tokens
    return append_tokens(q, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_slc, v_slc, k_swa, v_swa, cmp_block,
                         cmp_stride)


@decode_append_tokens.register_fake
def _decode_append_tokens_fake(q, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_slc, v_slc, k_swa, v_swa,
                               cmp_block, cmp_stride):
    B, S, Hkv, Dk, Dv = kv.shape[0], kv.shape[1], kv.shape[3], q.shape[3], v_slc.shape[3]
    C = -(-S // cmp_stride)
    return torch.empty_like(q), kv.new_empty(B, C, Hkv, cmp_block, Dk), kv.new_empty(B, C, Hkv, cmp_block, Dv)


@torch.library.custom_op("nsa::decode_append_compressed",
                         mutates_args=("cache_seqlens", "ring_k", "ring_v", "k_cmp", "v_cmp"))
def decode_append_compressed(k_new: Tensor, v_new: Tensor, kv: Tensor, inv_freq: Tensor, cache_seqlens: Tensor,
                             ring_k: Tensor, ring_v: Tensor, k_cmp: Tensor, v_cmp: Tensor, capacity: int,
                             cmp_block: int, cmp_stride: int) -> None:
    """phi's outputs into the compressed buffers where complete, the new cmp_src into the ring, cache_seqlens += S
    (ops/triton/decode_glue.py, launch 2)."""
    from .triton.decode_glue import append_compressed
    append_compressed(k_new, v_new, kv, inv_freq, cache_seqlens, ring_k, ring_v, k_cmp, v_cmp, capacity, cmp_block,
                      cmp_stride)


@decode_append_compressed.register_fake
def _decode_append_compressed_fake(*args):
    return None


# --- what the public entries call --------------------------------------------------------------------------------

def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config: NSAConfig, scale: float, backend: str,
                  cu_seqlens=None, seq_lens=None, kernel_options: KernelOptions | None = None, cu_seqlens_k=None,
                  seq_lens_k=None) -> Tensor:
    inputs = (q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)
    if backend == "triton":  # the kernels want contiguous inputs: copied once here, and the op saves the copies
        inputs = tuple(x.contiguous() for x in inputs)  # (inside the op the backward would copy them again)
    return torch.ops.nsa.attention(*inputs, *config_ints(config), scale, backend, options_key(kernel_options),
                                   cu_seqlens, seq_lens, cu_seqlens_k, seq_lens_k)[0]


def nsa_select_blocks(q, k_cmp, config: NSAConfig, scale: float, backend: str, cu_seqlens=None, seq_lens=None,
                      kernel_options: KernelOptions | None = None) -> Tensor:
    return torch.ops.nsa.select_blocks(q, k_cmp, *config_ints(config), scale, backend, options_key(kernel_options),
                                       cu_seqlens, seq_lens)


def nsa_decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config: NSAConfig,
                         scale: float, backend: str, host_seqlens=None, error_flag=None,
                         kernel_options: KernelOptions | None = None) -> Tensor:
    return torch.ops.nsa.decode_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens,
                                          *config_ints(config), scale, backend, options_key(kernel_options),
                                          host_seqlens, error_flag)
