"""KV caches for decoding: preallocated per-layer buffers that grow by writing, never by copying.

Glossary (the names cache.py, layer.py, graph.py and model.py use):
  token: one position of a sequence (SPEC.md's "raw token", as opposed to a compressed token).
  token buffers: the per-token keys (rotated) / values the attention reads: k_slc, v_slc, k_swa, v_swa of an
      NSACache, k, v of a KVCache (TOKEN_BUFFERS names them); slot p holds the token at position p.
  cmp_src (k_cmp_src, v_cmp_src): phi's input, the un-rotated keys / values of the compression branch
      (NativeSparseAttention._project); an NSACache keeps the last few in a ring (ring_k, ring_v).
  cache_seqlens: int32 [B] on the cache's device, the tokens each row holds (FlashAttention's name).
  host_seqlens: list of B ints, the host mirror of cache_seqlens (capacity checks never wait on the device).
  prompt_lens: the prompt length of each row of a right-padded (ragged) prefill.
  seq_lens: the lengths of the sequences packed by cu_seqlens (whole-sequence forward only).

NSACache (one per NativeSparseAttention layer) holds what SPEC.md's decoding section needs:
  k_slc, v_slc, k_swa, v_swa [B, capacity, Hkv, D]: the token buffers of the selection and window branches
      (with share_kv one pair, returned for both branches);
  k_cmp, v_cmp [B, cmp_capacity, Hkv, D]: the compressed keys (rotated at their block centre) / values,
      cmp_capacity = num_cmp_tokens(capacity); compressed token i sits in slot i (the storage has one spare
      slot more, where the torch glue's step writes the candidate tokens that complete nothing: see completed_blocks;
      the fused glue, ops/triton/decode_glue.py, writes nothing for them);
  ring_k, ring_v [B, R, Hkv, D]: the cmp_src of the last R tokens, position p in slot p % R,
      R = max(1, l - 1 + max_trim). Compressed token i is made by phi from the cmp_src of tokens [i*d, i*d + l) as soon
      as token i*d + l - 1 arrives, so only the tokens of blocks still under construction (at most the last
      l - 1) are ever needed again; the extra max_trim slots let trim() roll back up to max_trim tokens and
      still rebuild those blocks.
  cache_seqlens int32 [B]: row b's valid data is slots [0, cache_seqlens[b]) of the token buffers and
      [0, num_cmp_tokens(cache_seqlens[b])) of k_cmp / v_cmp; whatever lies beyond is ignored (so trim() only
      has to lower the lengths); host_seqlens mirrors it.
  rope_inv_freq float32 [Dk/2] (NSACache made with rope_base, as layer.new_cache makes it): the layer's rotary
      frequencies (nsa.rope.inverse_frequencies), read by the fused decoding step (ops/triton/decode_glue.py); None
      without rope_base (the step then keeps its torch glue).
  error_flag int32 [1] (NSACache): set to 1 by a decoding step that found a row out of range on the device
      (its outputs are NaN; see nsa_decode_attention); reset() clears it, ModelCache.check_decode_errors reads it.
KVCache (one per full-attention layer) holds the token buffers k, v [B, capacity, Hkv, D] and the lengths the
same way. Every buffer is a [B, T, Hkv, D] view of head-major storage (LayerCache._buffer).
ModelCache is the list of a model's layer caches, with the same reset / trim / nbytes.

The caches take plain sizes and only store (detached values: decoding is inference only); the layers make
them (NativeSparseAttention.new_cache, CausalSelfAttention.new_cache) and compute what goes in (.prefill, .step).
"""
from __future__ import annotations

import contextlib
import numbers

import torch

from .config import NSAConfig
from .rope import inverse_frequencies


class LayerCache:
    """Rows of token buffers [B, capacity, Hkv, D] plus cache_seqlens / host_seqlens; the part every cache shares.

    Takes plain sizes. Subclasses name their token buffers in TOKEN_BUFFERS (attribute names); their other
    buffers are covered by nbytes.
    """

    TOKEN_BUFFERS: tuple[str, ...] = ()

    def __init__(self, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, v_head_dim: int,
                 dtype: torch.dtype, device):
        for name, value in (("batch_size", batch_size), ("capacity", capacity)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        batch_size, capacity = int(batch_size), int(capacity)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.batch_size, self.capacity, self.dtype = batch_size, capacity, dtype
        self.device = torch.empty(0, device=device).device  # "cuda" resolved to "cuda:<current>", as inputs carry it
        for name in self.TOKEN_BUFFERS:
            dim = head_dim if name.startswith("k") else v_head_dim
            setattr(self, name, self._buffer(capacity, num_kv_heads, dim))
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=self.device)
        self.host_seqlens = [0] * batch_size  # host mirror of cache_seqlens

    def begin_prefill(self, x: torch.Tensor, prompt_lens) -> list[int]:
        """Empties the cache for prompts x [B, T, ...] (right-padded) of prompt_lens (B ints in [0, T]; None: all
        T), checks they fit, and returns prompt_lens as a list."""
        B, T = x.shape[:2]
        lens = [T] * B if prompt_lens is None else [int(n) for n in prompt_lens]
        if len(lens) != B or not all(0 <= n <= T for n in lens):
            raise ValueError(f"prompt_lens must hold {B} prompt lengths between 0 and {T}, got {prompt_lens!r}")
        self.reset()
        self.check_new(x, T)
        return lens

    def _buffer(self, tokens: int, heads: int, dim: int) -> torch.Tensor:
        """[B, tokens, heads, dim], stored head-major ([B, heads, tokens, dim] in memory): each head's tokens are
        contiguous, so the decoding kernels read whole key tiles and SDPA gets [B, H, T, D] without a copy
        (batch 32 at 64k on an H100: 1-1.5 us a step faster than token-major, benchmarks/ab_decode.py)."""
        return torch.zeros(self.batch_size, heads, tokens, dim, dtype=self.dtype, device=self.device).transpose(1, 2)

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the cache holds (cache_seqlens included; storage shared by views counted once)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in vars(self).values() if isinstance(t, torch.Tensor)}
        return sum(storages.values())

    @property
    def is_empty(self) -> bool:
        return max(self.host_seqlens) == 0

    def check_new(self, x: torch.Tensor, new_tokens: int) -> None:
        """x [B, S, ...] may append S = new_tokens tokens to every row: batch, device and capacity agree."""
        if x.shape[0] != self.batch_size:
            raise ValueError(f"the input has batch {x.shape[0]} but the cache was created for batch {self.batch_size}")
        if x.device != self.device:
            raise ValueError(f"the input is on {x.device} but the cache is on {self.device}")
        longest = max(self.host_seqlens)
        if longest + new_tokens > self.capacity:
            raise ValueError(f"cache capacity ({self.capacity} tokens) exceeded: a row holding {longest} tokens "
                             f"needs {longest + new_tokens} for {new_tokens} new ones; create the cache with "
                             f"capacity >= {longest + new_tokens}")

    def grow(self, capacity: int) -> None:
        """Reallocates the buffers for `capacity` tokens per row (at least the current capacity), keeping every
        row's contents and length: for decoding whose final length is not known when the cache is made. Copies the
        buffers once (grow geometrically to keep the cost amortized); a DecodeGraph captured on this cache before
        is no longer valid."""
        if not _is_int(capacity) or capacity < self.capacity:
            raise ValueError(f"capacity must be an int >= the current capacity ({self.capacity}), got {capacity!r}")
        for name in self.TOKEN_BUFFERS:
            setattr(self, name, self._grown(getattr(self, name), int(capacity)))
        self.capacity = int(capacity)

    def _grown(self, buffer: torch.Tensor, tokens: int) -> torch.Tensor:
        """A new [B, tokens, Hkv, D] buffer (head-major, as _buffer) starting with the contents of buffer."""
        new = self._buffer(tokens, *buffer.shape[2:])
        new[:, :buffer.shape[1]] = buffer
        return new

    def check_dtype(self, x: torch.Tensor) -> None:
        if x.dtype != self.dtype:
            raise TypeError(f"the layer produces keys/values of dtype {x.dtype} but the cache holds {self.dtype}; "
                            f"create the cache with dtype={x.dtype}")

    def next_positions(self, new_tokens: int) -> torch.Tensor:
        """long [B, S]: the positions (and slots) of S new tokens, cache_seqlens[b] .. cache_seqlens[b] + S - 1."""
        return self.cache_seqlens.long()[:, None] + torch.arange(new_tokens, device=self.device)

    def write(self, positions: torch.Tensor, **new: torch.Tensor) -> None:
        """Writes new tokens new[name] [B, S, Hkv, D] into token buffer `name` at positions long [B, S]
        (from next_positions). Does not advance the lengths: advance() does, once everything is written."""
        rows = torch.arange(self.batch_size, device=self.device)[:, None]
        for name, value in new.items():
            self.check_dtype(value)
            getattr(self, name)[rows, positions] = value.detach()

    def fill(self, prompt_lens: list[int], **full: torch.Tensor) -> None:
        """Replaces the contents with the first prompt_lens[b] tokens of each row of full[name] [B, T, Hkv, D]."""
        for name, value in full.items():
            self.check_dtype(value)
            getattr(self, name)[:, :value.shape[1]] = value.detach()  # slots past prompt_lens[b] are ignored
        self.set_seqlens(prompt_lens)

    def advance(self, new_tokens: int) -> None:
        """Every row grows by new_tokens: on the device in place (no host-to-device copy per decoding step)."""
        self.cache_seqlens += new_tokens
        self.advance_host(new_tokens)

    def advance_host(self, new_tokens: int) -> None:
        """The host mirror alone grows by new_tokens: after replaying a captured step (nsa.graph.DecodeGraph),
        whose device part already advanced cache_seqlens."""
        self.host_seqlens = [n + new_tokens for n in self.host_seqlens]

    def set_seqlens(self, host_seqlens: list[int]) -> None:
        """Sets the lengths of every row, on the host and (one copy) on the device."""
        self.host_seqlens = list(host_seqlens)
        self.cache_seqlens.copy_(torch.tensor(host_seqlens, dtype=torch.int32))

    @contextlib.contextmanager
    def host_seqlens_kept(self):
        """Restores host_seqlens on exit (even on error): around work that runs only the host side of a step, such
        as capturing it in a CUDA graph, where cache_seqlens does not move."""
        saved = list(self.host_seqlens)
        try:
            yield
        finally:
            self.host_seqlens = saved

    def reset(self, rows: list[int] | None = None) -> None:
        """Empties the given rows (a list of indices in [0, batch_size); None: all); the buffers are kept for reuse."""
        if rows is None:
            rows = range(self.batch_size)
        elif isinstance(rows, (str, bytes, torch.Tensor)) or not hasattr(rows, "__iter__") or \
                not all(_is_int(b) and 0 <= b < self.batch_size for b in rows):
            raise ValueError(f"rows must be None or a list of row indices in [0, {self.batch_size}), got {rows!r}")
        rows = {int(b) for b in rows}
        self.set_seqlens([0 if b in rows else n for b, n in enumerate(self.host_seqlens)])

    def trim(self, new_len: int | list[int]) -> None:
        """Rolls every row back to new_len tokens (an int for all rows, or one per row), e.g. to drop
        rejected speculative tokens; rows already shorter are left alone. Stepping again from there equals
        never having stepped past new_len."""
        if _is_int(new_len):
            new = [new_len] * self.batch_size
        elif isinstance(new_len, (str, bytes, torch.Tensor)) or not hasattr(new_len, "__iter__"):
            new = None
        else:
            new = list(new_len)
        if new is None or len(new) != self.batch_size or not all(_is_int(n) and n >= 0 for n in new):
            raise ValueError(f"new_len must be a non-negative int or a list of {self.batch_size} of them "
                             f"(ints; bools and floats are refused), got {new_len!r}")
        self.set_seqlens([min(int(n), old) for n, old in zip(new, self.host_seqlens)])


def default_dtype_device(weight: torch.Tensor, dtype: torch.dtype | None, device) -> tuple[torch.dtype, torch.device]:
    """dtype/device of a layer's cache: given, else the autocast dtype when autocast is on, else those of the
    layer's weight (a layer's new_cache passes one of its parameters)."""
    device = torch.device(device or weight.device)
    if dtype is None:
        autocasting = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocasting else weight.dtype
    return dtype, device


def _is_int(x) -> bool:
    """A Python or numpy int, not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class KVCache(LayerCache):
    """Full-attention cache: token buffers k (rotated), v [B, capacity, Hkv, D] and the lengths.

    nbytes = B * capacity * Hkv * (Dk + Dv) * element_size + 4 * B.
    """

    TOKEN_BUFFERS = ("k", "v")


class NSACache(LayerCache):
    """Cache of one NativeSparseAttention layer (see the module docstring for the buffers).

    nbytes = B * element_size * Hkv * (Dk + Dv) * (S * capacity + num_cmp_tokens(capacity) + 1 + l - 1 + max_trim)
             + 4 * B + 4 (cache_seqlens, error_flag) + 2 * Dk (rope_inv_freq, with rope_base),  with S = 1 if share_kv
             else 2 (token buffer sets of the selection and window branches).
    E.g. the paper's config (l = 32, d = 16), Hkv = 4, D = 128, bf16, share_kv=False, 128k tokens, B = 1:
    2 * 4 * 256 * (2 * 131072 + 8191 + 63) bytes = 554 MB, of which the compressed tokens are 3%.
    """

    def __init__(self, config: NSAConfig, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int, share_kv: bool, dtype: torch.dtype, device, max_trim: int | None = None,
                 rope_base: float | None = None):
        self.TOKEN_BUFFERS = ("k_slc", "v_slc") if share_kv else ("k_slc", "v_slc", "k_swa", "v_swa")
        super().__init__(batch_size, capacity, num_kv_heads, head_dim, v_head_dim, dtype, device)
        max_trim = config.cmp_block if max_trim is None else max_trim
        if not _is_int(max_trim) or max_trim < 0:
            raise ValueError(f"max_trim must be a non-negative int, got {max_trim!r}")
        max_trim = int(max_trim)
        self.config, self.share_kv, self.max_trim = config, share_kv, max_trim
        self.cmp_capacity = config.num_cmp_tokens(capacity)
        # slots 0 .. cmp_capacity - 1, then the spare slot that completed_blocks points idle candidates to
        self.cmp_slots_k = self._buffer(self.cmp_capacity + 1, num_kv_heads, head_dim)
        self.cmp_slots_v = self._buffer(self.cmp_capacity + 1, num_kv_heads, v_head_dim)
        self.k_cmp, self.v_cmp = self.cmp_slots_k[:, :self.cmp_capacity], self.cmp_slots_v[:, :self.cmp_capacity]
        self.ring_size = max(1, config.cmp_block - 1 + max_trim)  # >= 1: slots are positions modulo it
        # per row, the first position whose cmp_src the ring still holds: writes only raise it, trim() never lowers
        # it (a trim and new steps overwrite slots of positions that an earlier, longer history had pushed out)
        self.ring_start = [0] * self.batch_size
        self.ring_k = self._buffer(self.ring_size, num_kv_heads, head_dim)
        self.ring_v = self._buffer(self.ring_size, num_kv_heads, v_head_dim)
        if share_kv:  # one token buffer set serves both branches (nbytes counts it once)
            self.k_swa, self.v_swa = self.k_slc, self.v_slc
        self.error_flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        if rope_base is not None and not (isinstance(rope_base, numbers.Real) and rope_base > 0):
            raise ValueError(f"rope_base must be None or a positive number (the layer's rope_base), got {rope_base!r}")
        self.rope_base = rope_base
        self.rope_inv_freq = None if rope_base is None else inverse_frequencies(head_dim, rope_base, self.device)

    def grow(self, capacity: int) -> None:
        """LayerCache.grow; the compressed slots grow with it (the spare slot stays last), the ring is kept."""
        super().grow(capacity)
        self.cmp_capacity = self.config.num_cmp_tokens(self.capacity)
        self.cmp_slots_k = self._grown(self.k_cmp, self.cmp_capacity + 1)
        self.cmp_slots_v = self._grown(self.v_cmp, self.cmp_capacity + 1)
        self.k_cmp, self.v_cmp = self.cmp_slots_k[:, :self.cmp_capacity], self.cmp_slots_v[:, :self.cmp_capacity]
        if self.share_kv:
            self.k_swa, self.v_swa = self.k_slc, self.v_slc

    def advance_host(self, new_tokens: int) -> None:
        super().advance_host(new_tokens)
        self.ring_start = [max(r, n - self.ring_size) for r, n in zip(self.ring_start, self.host_seqlens)]

    def reset(self, rows: list[int] | None = None) -> None:
        """LayerCache.reset; emptied rows' ring starts over, and error_flag back to 0."""
        super().reset(rows)
        self.ring_start = [r if n else 0 for r, n in zip(self.ring_start, self.host_seqlens)]
        self.error_flag.zero_()

    def _next_block_start(self, n: int) -> int:
        """First position a row of n tokens will need again: the start of its next compressed block."""
        return min(self.config.num_cmp_tokens(n) * self.config.cmp_stride, n)

    def completed_blocks(self, cmp_src_k: torch.Tensor, cmp_src_v: torch.Tensor):
        """The compressed tokens that S new tokens (their cmp_src cmp_src_k, cmp_src_v [B, S, Hkv, D]) complete, with
        shapes fixed by B and S and no host data (a step stays capturable in a CUDA graph).

        Compressed token i of row b (length L_b) is complete once token i*d + l - 1 < L_b + S: the new ones
        are i in [num_cmp_tokens(L_b), num_cmp_tokens(L_b + S)), at most C = ceil(S / d) of them. Every row gets
        C candidates i = num_cmp_tokens(L_b) + c. Returns ids long [B, C] (the candidates' i), slots long [B, C]
        (i where candidate c is complete, else the spare slot cmp_capacity) and their cmp_src blocks
        k_blocks [B, C, l, Hkv, Dk], v_blocks [B, C, l, Hkv, Dv] (un-rotated, in order; filler for the others).
        """
        cfg, R = self.config, self.ring_size
        l, d, S = cfg.cmp_block, cfg.cmp_stride, cmp_src_k.shape[1]
        L = self.cache_seqlens.long()[:, None]  # [B, 1]
        ids = torch.where(L >= l, (L - l) // d + 1, 0) + torch.arange(-(-S // d), device=self.device)  # [B, C]
        complete = ids * d + l <= L + S
        slots = torch.where(complete, ids, self.cmp_capacity)
        # context of row b: positions L_b - R .. L_b + S - 1 (the ring unrolled, then the new tokens); a complete
        # block starts at or after L_b - R (R >= l - 1), the others are clamped inside
        starts = (ids * d - (L - R)).clamp(0, R + S - l)
        rows = torch.arange(self.batch_size, device=self.device)[:, None, None]
        offsets = starts[:, :, None] + torch.arange(l, device=self.device)  # [B, C, l]
        index = ((L - R + torch.arange(R, device=self.device)) % R)[:, :, None, None]  # ring slot of each position
        blocks = []
        for ring, new in ((self.ring_k, cmp_src_k), (self.ring_v, cmp_src_v)):
            context = torch.cat((ring.gather(1, index.expand(-1, -1, *ring.shape[2:])), new), dim=1)
            blocks.append(context[rows, offsets])
        return ids, slots, blocks[0], blocks[1]

    def append(self, positions: torch.Tensor, cmp_src_k: torch.Tensor, cmp_src_v: torch.Tensor, slots: torch.Tensor,
               k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> None:
        """Stores the new tokens' cmp_src keys/values [B, S, Hkv, D] (at positions long [B, S]) in the ring
        and the compressed tokens k_cmp [B, C, Hkv, Dk], v_cmp [B, C, Hkv, Dv] in slots long [B, C] (from
        completed_blocks); then advances the lengths by S (the token buffers were written by write())."""
        keep = min(cmp_src_k.shape[1], self.ring_size)  # only the last R tokens' cmp_src can be needed again
        batch = torch.arange(self.batch_size, device=self.device)[:, None]
        ring_slots = positions[:, -keep:] % self.ring_size
        self.ring_k[batch, ring_slots] = cmp_src_k[:, -keep:].detach()
        self.ring_v[batch, ring_slots] = cmp_src_v[:, -keep:].detach()
        self.check_dtype(k_cmp)
        self.cmp_slots_k[batch, slots] = k_cmp.detach()
        self.cmp_slots_v[batch, slots] = v_cmp.detach()
        self.advance(cmp_src_k.shape[1])

    def fill_cmp(self, prompt_lens: list[int], cmp_src_k: torch.Tensor, cmp_src_v: torch.Tensor, k_cmp: torch.Tensor,
                 v_cmp: torch.Tensor) -> None:
        """Prefill's part: whole-prompt cmp_src keys/values [B, T, Hkv, D] (the ring keeps each row's last
        R) and compressed tokens [B, num_cmp_tokens(T), Hkv, D] (row b keeps its first
        num_cmp_tokens(prompt_lens[b]))."""
        self.check_dtype(k_cmp)
        self.k_cmp[:, :k_cmp.shape[1]] = k_cmp.detach()
        self.v_cmp[:, :v_cmp.shape[1]] = v_cmp.detach()
        for b, n in enumerate(prompt_lens):
            self.ring_start[b] = max(0, n - self.ring_size)
            positions = torch.arange(max(0, n - self.ring_size), n, device=self.device)
            self.ring_k[b, positions % self.ring_size] = cmp_src_k[b, positions].detach()
            self.ring_v[b, positions % self.ring_size] = cmp_src_v[b, positions].detach()

    def trim(self, new_len: int | list[int]) -> None:
        """LayerCache.trim; the compressed tokens made from trimmed tokens drop out with the lengths.

        Raises ValueError when a row would roll back further than the cmp_src ring reaches: max_trim tokens from
        the longest the row has been, so trims add up (trim by 2, step 1, trim by 2 is a roll back by 3).
        """
        old = list(self.host_seqlens)
        super().trim(new_len)
        for b, (n, m) in enumerate(zip(old, self.host_seqlens)):
            if m and self.ring_start[b] > self._next_block_start(m):
                self.set_seqlens(old)
                reach = self.ring_start[b] + self.ring_size - m  # from the longest this row has been since refilled
                raise ValueError(f"trim: row {b} would roll back {reach} tokens from its longest state ({n - m} from "
                                 f"now; trims add up until new tokens refill the cmp_src ring) but this cache can "
                                 f"roll back at most {self.max_trim}; create it with max_trim >= {reach}")


class ModelCache:
    """The caches of a model's layers, in order; reset / trim / nbytes act on all of them."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers

    @property
    def cache_seqlens(self) -> torch.Tensor:
        """int32 [B] on the device: tokens each row holds (the same in every layer)."""
        return self.layers[0].cache_seqlens

    @property
    def host_seqlens(self) -> list[int]:
        """The host mirror of cache_seqlens."""
        return self.layers[0].host_seqlens

    @property
    def is_empty(self) -> bool:
        return self.layers[0].is_empty

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)

    def check_new(self, x: torch.Tensor, new_tokens: int) -> None:
        """LayerCache.check_new (every layer holds the same rows and lengths)."""
        self.layers[0].check_new(x, new_tokens)

    def advance_host(self, new_tokens: int) -> None:
        """LayerCache.advance_host in every layer."""
        for c in self.layers:
            c.advance_host(new_tokens)

    @contextlib.contextmanager
    def host_seqlens_kept(self):
        """LayerCache.host_seqlens_kept for every layer."""
        with contextlib.ExitStack() as stack:
            for c in self.layers:
                stack.enter_context(c.host_seqlens_kept())
            yield

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def grow(self, capacity: int) -> None:
        """LayerCache.grow in every layer."""
        for c in self.layers:
            c.grow(capacity)

    def reset(self, rows: list[int] | None = None) -> None:
        for c in self.layers:
            c.reset(rows)

    def check_decode_errors(self) -> None:
        """Raises RuntimeError when a decoding step since the last reset() found a row's length out of range on the
        device (NSA layers' error_flag; that row's outputs were NaN). Reads the flags once: a device sync."""
        flags = [c.error_flag for c in self.layers if isinstance(c, NSACache)]
        if flags and torch.cat(flags).any().item():
            raise RuntimeError("a decoding step found a cache row whose length is out of range (below the new tokens, "
                               "past the capacity or past the compressed capacity): its outputs were NaN. The device "
                               "lengths no longer match the cache's host mirror (host_seqlens); reset() the cache")

    def trim(self, new_len: int | list[int]) -> None:
        for c in self.layers:
            c.trim(new_len)
