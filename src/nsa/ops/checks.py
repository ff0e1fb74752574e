"""Input validation shared by every backend: each error names the argument and the fix."""
from __future__ import annotations

import math
import numbers

import torch

from ..config import NSAConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(name: str, x, rank: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if rank == 4 and (x.shape[2] < 1 or x.shape[3] < 1):
        raise ValueError(f"{name} must have at least one head and a head dim >= 1 ([B, T, H, D]), "
                         f"got shape {tuple(x.shape)}")


def _expect(name: str, x: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if x.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] ({meaning}) must be {expected}, got shape {tuple(x.shape)}")


def cmp_seqlens(seq_lens: list[int], config: NSAConfig) -> list[int]:
    """Compressed-token count of each sequence."""
    return [config.num_cmp_tokens(n) for n in seq_lens]


def check_cu_seqlens(cu_seqlens, total: int, batch: int, device: torch.device, name: str = "cu_seqlens") -> list[int]:
    """Validates cu_seqlens ([N + 1] int32, 0 .. total, non-decreasing), called `name` in errors; returns the
    sequence lengths."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {cu_seqlens.dtype}; "
                        f"use {name}.to(torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device} but q is on {device}; move it with .to(q.device)")
    if batch != 1:
        raise ValueError(f"with {name} the inputs must be packed as [1, total, H, D], got batch {batch}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != total:
        raise ValueError(f"{name} must start at 0 and end at the packed length {total}, "
                         f"got {offsets[0]} .. {offsets[-1]}")
    lens = [b - a for a, b in zip(offsets[:-1], offsets[1:])]
    if min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing")
    return lens


def check_key_seqlens(cu_seqlens_k, seq_lens: list[int] | None, total_k: int, batch: int,
                      device: torch.device) -> list[int] | None:
    """Validates the keys' cu_seqlens_k of suffix queries against the queries' lengths seq_lens (None: dense);
    returns the key lengths (None without cu_seqlens_k)."""
    if cu_seqlens_k is None:
        return None
    if seq_lens is None:
        raise ValueError("cu_seqlens_k (the keys' offsets) needs cu_seqlens (the queries' offsets) beside it; "
                         "dense suffix queries need neither: pass keys longer than q")
    key_lens = check_cu_seqlens(cu_seqlens_k, total_k, batch, device, name="cu_seqlens_k")
    if len(key_lens) != len(seq_lens):
        raise ValueError(f"cu_seqlens_k must describe as many sequences as cu_seqlens ({len(seq_lens)}), "
                         f"got {len(key_lens)}")
    for i, (n, nk) in enumerate(zip(seq_lens, key_lens)):
        if nk < n:
            raise ValueError(f"sequence {i} has {n} queries but {nk} keys: the queries are the last positions of the "
                             "keys' sequence, so cu_seqlens_k must give every sequence at least as many keys")
    return key_lens


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite positive number or None (for Dk ** -0.5), got {scale!r}")
    return float(scale)


def check_config(config) -> NSAConfig:
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    return config


def _check_like_q(name: str, x, q: torch.Tensor) -> None:
    """x is a rank-4 float tensor with q's dtype, device and batch."""
    _check_tensor(name, x, 4)
    if x.dtype != q.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; all inputs must share one dtype")
    if x.device != q.device:
        raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must be on one device")
    _expect(name, x, 0, q.shape[0], "batch, as in q")


def _check_gqa(q: torch.Tensor, k_cmp: torch.Tensor) -> None:
    Hq, Hkv = q.shape[2], k_cmp.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"the query heads of q ({Hq}) must be a multiple of the key/value heads of k_cmp ({Hkv})")


def _check_heads_and_dims(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates) -> None:
    """Every key/value input has k_cmp's heads, keys have q's Dk, values v_cmp's Dv; gates [., ., Hq, 3]."""
    Hq, Dk = q.shape[2], q.shape[3]
    Hkv, Dv = k_cmp.shape[2], v_cmp.shape[3]
    kv = {"v_cmp": v_cmp, "k_slc": k_slc, "v_slc": v_slc, "k_swa": k_swa, "v_swa": v_swa}
    for name, x in kv.items():
        _expect(name, x, 2, Hkv, "key/value heads, as in k_cmp")
    for name in ("k_slc", "k_swa"):
        _expect(name, kv[name], 3, Dk, "Dk, as in q")
    for name in ("v_slc", "v_swa"):
        _expect(name, kv[name], 3, Dv, "Dv, as in v_cmp")
    _expect("gates", gates, 2, Hq, "query heads, as in q")
    _expect("gates", gates, 3, 3, "the gates of (cmp, slc, swa)")


def check_select_inputs(q, k_cmp, config, cu_seqlens) -> list[int] | None:
    """Checks q [B, T, Hq, Dk] and k_cmp [B, Tc, Hkv, Dk]; returns the sequence lengths when packed."""
    check_config(config)
    _check_tensor("q", q, 4)
    B, T, Hq, Dk = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one token, got shape {tuple(q.shape)}")
    _check_like_q("k_cmp", k_cmp, q)
    _check_gqa(q, k_cmp)
    _expect("k_cmp", k_cmp, 3, Dk, "Dk, as in q")
    lens = None
    if cu_seqlens is None:
        expected_tc = config.num_cmp_tokens(T)
    else:
        lens = check_cu_seqlens(cu_seqlens, T, B, q.device)
        expected_tc = sum(cmp_seqlens(lens, config))
    _expect("k_cmp", k_cmp, 1, expected_tc,
            f"compressed tokens: Tc = floor((T - {config.cmp_block}) / {config.cmp_stride}) + 1 per sequence, 0 if T < "
            f"{config.cmp_block}")
    return lens


def check_attention_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, config, cu_seqlens,
                           cu_seqlens_k=None):
    """Checks the eight inputs of nsa_attention against SPEC.md's shapes; returns (query lengths, key lengths) when
    packed (key lengths None without cu_seqlens_k), else (None, None).

    Suffix queries: the raw keys k_slc may hold Tk >= T tokens (the queries being the last T); k_cmp then holds the
    compressed tokens of the Tk keys, and with cu_seqlens_k (packed) each sequence's keys are its own.
    """
    check_config(config)
    _check_tensor("q", q, 4)
    B, T = q.shape[:2]
    if T < 1:
        raise ValueError(f"q must hold at least one token, got shape {tuple(q.shape)}")
    _check_tensor("k_slc", k_slc, 4)
    Tk = k_slc.shape[1]
    lens = None if cu_seqlens is None else check_cu_seqlens(cu_seqlens, T, B, q.device)
    key_lens = check_key_seqlens(cu_seqlens_k, lens, Tk, B, q.device)
    if cu_seqlens is None and Tk < T:
        raise ValueError(f"k_slc holds {Tk} tokens but q {T}: the keys must cover the queries (Tk >= T, the queries "
                         "being the last T positions)")
    if cu_seqlens is not None and cu_seqlens_k is None:
        _expect("k_slc", k_slc, 1, T, "tokens, as in q; pass cu_seqlens_k for packed keys longer than the queries")
    _check_like_q("k_cmp", k_cmp, q)
    _check_gqa(q, k_cmp)
    _expect("k_cmp", k_cmp, 3, q.shape[3], "Dk, as in q")
    expected_tc = config.num_cmp_tokens(Tk) if lens is None else sum(cmp_seqlens(key_lens or lens, config))
    _expect("k_cmp", k_cmp, 1, expected_tc,
            f"compressed tokens of the keys: floor((Tk - {config.cmp_block}) / {config.cmp_stride}) + 1 per sequence, "
            f"0 if Tk < {config.cmp_block}")
    expected = {"v_cmp": (k_cmp.shape[1], "tokens, as in k_cmp"), "k_slc": (Tk, "tokens"),
                "v_slc": (Tk, "tokens, as in k_slc"), "k_swa": (Tk, "tokens, as in k_slc"),
                "v_swa": (Tk, "tokens, as in k_slc"), "gates": (T, "tokens, as in q")}
    for name, x in {"v_cmp": v_cmp, "k_slc": k_slc, "v_slc": v_slc, "k_swa": k_swa, "v_swa": v_swa,
                    "gates": gates}.items():
        _check_like_q(name, x, q)
        _expect(name, x, 1, *expected[name])
    _check_heads_and_dims(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)
    return lens, key_lens


def check_decode_inputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, cache_seqlens, config,
                        error_flag=None) -> None:
    """Shapes, dtypes and devices of a decoding step (the values of cache_seqlens are checked where they are read)."""
    check_config(config)
    _check_tensor("q", q, 4)
    tensors = {"k_cmp": k_cmp, "v_cmp": v_cmp, "k_slc": k_slc, "v_slc": v_slc, "k_swa": k_swa,
               "v_swa": v_swa, "gates": gates}
    for name, x in tensors.items():
        _check_like_q(name, x, q)
    _check_gqa(q, k_cmp)
    _expect("k_cmp", k_cmp, 3, q.shape[3], "Dk, as in q")
    _check_heads_and_dims(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates)
    _expect("gates", gates, 1, q.shape[1], "new tokens, as in q")
    _expect("v_cmp", v_cmp, 1, k_cmp.shape[1], "compressed capacity, as in k_cmp")
    for name in ("v_slc", "k_swa", "v_swa"):
        _expect(name, tensors[name], 1, k_slc.shape[1], "cache capacity, as in k_slc")
    B = q.shape[0]
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (B,):
        got = f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}" if isinstance(cache_seqlens, torch.Tensor) else \
            type(cache_seqlens).__name__
        raise TypeError(f"cache_seqlens must be an int32 tensor of shape [{B}] (tokens held by each batch row), "
                        f"got {got}")
    if cache_seqlens.device != q.device:
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device} but q is on {q.device}; "
                         "move it with .to(q.device)")
    if error_flag is not None:
        if not isinstance(error_flag, torch.Tensor) or error_flag.dtype != torch.int32 or error_flag.shape != (1,):
            raise TypeError("error_flag must be None or an int32 tensor of shape [1] (e.g. torch.zeros(1, "
                            "dtype=torch.int32, device=q.device))")
        if error_flag.device != q.device:
            raise ValueError(f"error_flag is on {error_flag.device} but q is on {q.device}; move it with .to(q.device)")


def check_host_seqlens(host_seqlens, batch: int) -> list[int]:
    """host_seqlens, the host copy of cache_seqlens: a list (or tuple) of `batch` ints; returns it as a list."""
    if not isinstance(host_seqlens, (list, tuple)) or len(host_seqlens) != batch or \
            not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in host_seqlens):
        raise TypeError(f"host_seqlens must be None or a list of {batch} ints (the host copy of cache_seqlens, "
                        f"e.g. an NSACache's host_seqlens), got {host_seqlens!r}")
    return [int(n) for n in host_seqlens]


def check_decode_lengths(lengths: list[int], new_tokens: int, capacity: int, cmp_capacity: int,
                         config: NSAConfig, name: str = "cache_seqlens") -> None:
    """Each row holds its new tokens and fits its buffers (a host-side check of lengths, named `name`)."""
    for b, n in enumerate(lengths):
        if not new_tokens <= n <= capacity:
            raise ValueError(f"{name}[{b}] = {n} (row {b}) must be between the new tokens ({new_tokens}) and the "
                             f"cache capacity ({capacity})")
        if config.num_cmp_tokens(n) > cmp_capacity:
            raise ValueError(f"{name}[{b}] = {n} (row {b}) needs {config.num_cmp_tokens(n)} compressed tokens but "
                             f"k_cmp holds {cmp_capacity}")
