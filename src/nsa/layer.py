"""NativeSparseAttention: the NSA attention layer (projections, compression, rotary embedding, gates)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import NSAConfig
from .cache import NSACache, default_dtype_device
from .distributed import ContextParallelLayout, attend_gathered, gather_rows
from .ops import (KernelOptions, NSAInputs, _resolve_backend, check_kernel_options, decode_glue_fused,
                  nsa_attention, nsa_decode_attention)
from .ops.library import decode_append_compressed, decode_append_tokens
from .ops.checks import check_cu_seqlens
from .rope import apply_rope, positions_from_cu_seqlens, rope_cos_sin, rotate

BRANCHES = ("cmp", "slc", "swa")


def check_branches(branches) -> tuple[str, ...]:
    """A non-empty subset of BRANCHES (list or tuple, any order) -> a tuple in BRANCHES' order, else ValueError."""
    if isinstance(branches, str) or not all(isinstance(b, str) for b in branches):
        raise ValueError(f"branches must be a list or tuple of names from {BRANCHES}, got {branches!r}")
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown or not branches:
        raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {tuple(branches)!r}")
    return tuple(b for b in BRANCHES if b in branches)


def check_ungated(ungated, branches: tuple[str, ...]) -> tuple[str, ...]:
    """A subset (possibly empty) of the branches that are on -> a tuple in BRANCHES' order, else ValueError."""
    if isinstance(ungated, str) or not all(isinstance(b, str) for b in ungated):
        raise ValueError(f"ungated must be a list or tuple of names from {branches}, got {ungated!r}")
    if any(b not in branches for b in ungated):
        raise ValueError(f"ungated must be a subset of the branches that are on, {branches}, got {tuple(ungated)!r}")
    return tuple(b for b in BRANCHES if b in ungated)


def cmp_block_index(seq_lens: list[int], config: NSAConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the compressed tokens of (packed) sequences of lengths seq_lens read their cmp_src tokens.

    Sequence s (length L_s, starting at offset o_s in the packed tensor) has Tc_s compressed tokens
    (0 if L_s < l, else (L_s - l) // d + 1); its token i covers tokens [i*d, i*d + l).
    Returns index long [sum Tc_s, l] (packed token indices) and ids long [sum Tc_s] (each token's i
    inside its own sequence).
    """
    l, d = config.cmp_block, config.cmp_stride
    ids, packed, offset = [], [], 0
    for n in seq_lens:
        i = torch.arange(config.num_cmp_tokens(n), device=device)
        ids.append(i)
        packed.append(i * d + offset)  # block start in the packed tensor
        offset += n
    index = torch.cat(packed)[:, None] + torch.arange(l, device=device)
    return index, torch.cat(ids)


class Compressor(nn.Module):
    """phi: maps each block of l cmp_src vectors (plus a learned intra-block position embedding) to one vector.

    blocks [B, Tc, l, H, D] -> [B, Tc, H, D]; the weights are shared by all heads.
    phi(block) = W2 gelu(W1 [x_0 + e_0, ..., x_{l-1} + e_{l-1}] + b1) + b2, W1: l*D -> hidden, W2: hidden -> D.
    Note: with a linear first layer, e only adds the constant W1 e (W1 already tells the l slots
    apart); it is kept as the paper formulates phi and so that a different first layer can use it.
    """

    def __init__(self, block: int, dim: int, hidden: int):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(block, dim))  # e: [l, D]
        self.mlp = nn.Sequential(nn.Linear(block * dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        x = blocks + self.pos_emb[:, None, :]  # [B, Tc, l, H, D]
        x = x.transpose(2, 3).flatten(3)  # [B, Tc, H, l*D]
        return self.mlp(x)


class NativeSparseAttention(nn.Module):
    """NSA attention layer: x [B, T, hidden_size] -> [B, T, hidden_size].

    o_t = g_cmp * Attn(q_t, K_cmp, V_cmp) + g_slc * Attn(q_t, K_slc, V_slc) + g_swa * Attn(q_t, K_swa, V_swa)
    (the exact branches are in SPEC.md), with
      q = RoPE(x W_q) at the token positions t;
      per branch b, keys/values x W_k^b, x W_v^b (one shared pair for all three if share_kv=True; for the
        cmp branch they are the cmp_src);
      K_slc, K_swa = RoPE(keys) at positions t;
      K_cmp[i] = RoPE(phi_k(cmp_src keys of block i, un-rotated), i*d + (l - 1) / 2), V_cmp[i] = phi_v(values);
      gates g = sigmoid(x W_g + b_g) [B, T, num_heads, 3], order (cmp, slc, swa);
      output projection num_heads*v_head_dim -> hidden_size.

    Position of the compressed keys. phi reads UN-rotated keys, so a block's summary does not depend
    on where the block sits (shift-invariant: the same content gives the same summary at any offset);
    phi sees the block's keys in order (plus the learned intra-block embedding), so it knows where each
    key sits inside the block. The summary is then rotated as a single key at the block's centre,
    i*d + (l - 1) / 2 (fractional when l is even).
    q_t . K_cmp[i] then depends on position only through t - centre, exactly as q_t . k_u does for a
    token's key at u, so compressed and token scores speak the same relative-position language, and the
    block scores that drive the top-n selection are comparable across blocks.

    Packed variable-length input: x [1, total, hidden] with cu_seqlens (int32 [N + 1]); positions
    restart at 0 in every sequence and every sequence gets its own compressed tokens.
    backend and kernel_options (an nsa.KernelOptions tuning the Triton kernels; None: the library's choices) are
    passed to every op the layer runs (nsa_attention, nsa_decode_attention; None backend: fastest available).

    branches: the branches whose gates are learned, a non-empty subset of ("cmp", "slc", "swa"); the gates of
    the others are forced to exactly 0 (an ablation: ("swa",) is a sliding-window-only layer, whose output at t
    depends on no token before t - w + 1). The forced-off branches are still computed (the op's cost is
    unchanged): this compares quality, not speed.
    ungated: branches (a subset of branches, default none) added with a weight of exactly 1 instead of a learned
    gate, an ablation: ("cmp",) keeps the compressed branch, whose scores rank the selected blocks, in the output
    whatever the gate would have learned.

    fuse_decode_glue (an attribute, True by default): step() runs its glue (the rotary embeddings of q and the new
    keys, the cache writes, the gather of the candidate compressed blocks) as the two Triton kernels of
    ops/triton/decode_glue.py around phi, whenever the decoding op runs the Triton backend and the cache keeps the
    layer's rotary frequencies (new_cache's do); False keeps the torch glue, the reference path. A subclass that
    redefines _project or _compress (nsa.hf's, with its own rotary) always keeps the torch glue.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, config: NSAConfig = NSAConfig(), share_kv: bool = False,
                 rope_base: float = 10000.0, backend: str | None = None, branches: tuple[str, ...] = BRANCHES,
                 ungated: tuple[str, ...] = (), kernel_options: KernelOptions | None = None):
        super().__init__()
        v_head_dim = head_dim if v_head_dim is None else v_head_dim
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("v_head_dim", v_head_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary embedding, got {head_dim}")
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
        if not rope_base > 0:
            raise ValueError(f"rope_base must be positive, got {rope_base!r}")
        branches = check_branches(branches)
        ungated = check_ungated(ungated, branches)
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim
        self.config, self.share_kv, self.rope_base, self.backend = config, share_kv, rope_base, backend
        self.kernel_options = check_kernel_options(kernel_options)

        self.num_kv_sets = 1 if share_kv else len(BRANCHES)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        # all key/value projections in one matmul: [num_kv_sets, num_kv_heads, head_dim + v_head_dim] outputs
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_sets * num_kv_heads * (head_dim + v_head_dim), bias=False)
        l = config.cmp_block  # phi's hidden width: 4x the head dim, like a transformer MLP
        self.compress_k = Compressor(l, head_dim, 4 * head_dim)
        self.compress_v = Compressor(l, v_head_dim, 4 * v_head_dim)
        self.gate_proj = nn.Linear(hidden_size, num_heads * len(BRANCHES))
        self.o_proj = nn.Linear(num_heads * v_head_dim, hidden_size, bias=False)
        self.branches, self.ungated = branches, ungated
        # gates = sigmoid(...) * gate_mask + gate_fixed: mask 1 for a learned gate, 0 for one forced off or ungated;
        # fixed 1 for an ungated branch. Buffers (not saved) so that they follow .to(device).
        self.register_buffer("gate_mask", torch.empty(len(BRANCHES)), persistent=False)
        self.register_buffer("gate_fixed", torch.empty(len(BRANCHES)), persistent=False)
        self.reset_gate_mask()
        self.fuse_decode_glue = True

    @torch.no_grad()
    def reset_gate_mask(self) -> None:
        """Writes gate_mask and gate_fixed from self.branches and self.ungated: for loaders that make modules on the
        meta device and fill only the saved tensors (transformers 5's from_pretrained), which leaves these unsaved
        buffers uninitialized."""
        learned = [b in self.branches and b not in self.ungated for b in BRANCHES]
        self.gate_mask.copy_(torch.tensor([float(b) for b in learned]))
        self.gate_fixed.copy_(torch.tensor([float(b in self.ungated) for b in BRANCHES]))

    def _check_input(self, x, cu_seqlens) -> list[int]:
        """Validates x (and cu_seqlens); returns seq_lens, the packed sequences' lengths ([T] when not packed)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a [batch, tokens, hidden_size] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x.shape[-1] must be hidden_size={self.hidden_size}, got shape {tuple(x.shape)}")
        if cu_seqlens is None:
            return [x.shape[1]]
        return check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0], x.device)

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The per-token part of the inputs: x [B, T, hidden_size] at positions [T] or [B, T] ->
        q [B, T, Hq, Dk] (rotated), k_cmp_src, v_cmp_src [B, T, Hkv, Dk or Dv] (phi's input: the
        un-rotated keys/values of the compression branch), k_slc, v_slc, k_swa, v_swa [B, T, Hkv, Dk or Dv]
        (keys rotated), gates [B, T, Hq, 3]."""
        B, T, _ = x.shape
        Hkv, Dk, Dv = self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, Dk)
        cos_sin = rope_cos_sin(positions, Dk, self.rope_base, q.dtype)  # once for q and both rotated keys
        q = rotate(q, *cos_sin)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, Hkv, Dk + Dv)
        keys, values = kv.split((Dk, Dv), dim=-1)  # [B, T, num_kv_sets, Hkv, D]
        k_cmp_src, k_slc, k_swa = keys.unbind(2) if not self.share_kv else (keys[:, :, 0],) * 3
        v_cmp_src, v_slc, v_swa = values.unbind(2) if not self.share_kv else (values[:, :, 0],) * 3
        k_slc = rotate(k_slc, *cos_sin)
        k_swa = k_slc if self.share_kv else rotate(k_swa, *cos_sin)
        return q, k_cmp_src, v_cmp_src, k_slc, v_slc, k_swa, v_swa, self._gates(x)

    def _gates(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, hidden_size] -> gates [B, T, Hq, 3] in (0, 1), exactly 0 for the branches forced off and exactly
        1 for the ungated ones."""
        gates = torch.sigmoid(self.gate_proj(x)).view(*x.shape[:2], self.num_heads, len(BRANCHES))
        if self.ungated:
            gates = torch.addcmul(self.gate_fixed.to(gates.dtype), gates, self.gate_mask.to(gates.dtype))
        elif self.branches != BRANCHES:
            gates = gates * self.gate_mask.to(gates.dtype)
        return gates

    def _compress(self, k_blocks: torch.Tensor, v_blocks: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Compressed tokens from blocks of cmp_src [B, N, l, Hkv, Dk or Dv] with indices ids long [N] or [B, N]:
        k_cmp = RoPE(phi_k(block), i*d + (l - 1) / 2) [B, N, Hkv, Dk], v_cmp = phi_v(block) [B, N, Hkv, Dv]."""
        centre = ids.double() * self.config.cmp_stride + (self.config.cmp_block - 1) / 2
        return apply_rope(self.compress_k(k_blocks), centre, self.rope_base), self.compress_v(v_blocks)

    def _cmp_blocks(self, k_cmp_src: torch.Tensor, v_cmp_src: torch.Tensor, seq_lens: list[int], packed: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_blocks [B, Tc, l, Hkv, Dk], v_blocks [B, Tc, l, Hkv, Dv], ids long [Tc]): block i of cmp_src
        [B, T, Hkv, D] is its tokens [i*d, i*d + l) (of its own sequence when packed). Unpacked, the blocks are
        strided windows of cmp_src, a view (no gather, and a backward that is one unfold_backward instead of an
        accumulating index_put); packed, a gather through cmp_block_index."""
        l, d = self.config.cmp_block, self.config.cmp_stride
        if packed or k_cmp_src.shape[1] < l:
            index, ids = cmp_block_index(seq_lens, self.config, k_cmp_src.device)
            return k_cmp_src[:, index], v_cmp_src[:, index], ids
        windows = [src.unfold(1, l, d).movedim(-1, 2) for src in (k_cmp_src, v_cmp_src)]  # [B, Tc, l, Hkv, D]
        return (*windows, torch.arange(windows[0].shape[1], device=k_cmp_src.device))

    def _whole_sequence(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[NSAInputs, tuple]:
        """(the eight nsa_attention inputs, (k_cmp_src, v_cmp_src): phi's inputs) of whole sequences x."""
        seq_lens = self._check_input(x, cu_seqlens)
        positions = torch.arange(x.shape[1], device=x.device) if cu_seqlens is None else \
            positions_from_cu_seqlens(cu_seqlens)
        q, k_cmp_src, v_cmp_src, k_slc, v_slc, k_swa, v_swa, gates = self._project(x, positions)
        # compression: each block [i*d, i*d + l) of cmp_src, summarized, rotated at its centre
        k_cmp, v_cmp = self._compress(*self._cmp_blocks(k_cmp_src, v_cmp_src, seq_lens, cu_seqlens is not None))
        return NSAInputs(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates), (k_cmp_src, v_cmp_src)

    def nsa_inputs(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> NSAInputs:
        """The eight inputs of nsa.nsa_attention computed from x [B, T, hidden_size], as an nsa.NSAInputs:

        q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk], v_cmp [B, Tc, Hkv, Dv], k_slc, v_slc, k_swa, v_swa
        [B, T, Hkv, Dk or Dv], gates [B, T, Hq, 3] (packed [1, total, ...] with cu_seqlens).
        """
        return self._whole_sequence(x, cu_seqlens)[0]

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                context_parallel: ContextParallelLayout | None = None) -> torch.Tensor:
        """x [B, T, hidden_size] (or [1, total, hidden_size] packed, with cu_seqlens int32 [N + 1]) -> same shape.

        context_parallel: x is this rank's shard [B, local_len, hidden_size] of the layout's batch (which also
        carries the packing: cu_seqlens stays None); see _context_parallel.
        """
        if context_parallel is not None:
            if cu_seqlens is not None:
                raise ValueError("with context_parallel the layout carries the packing: pass cu_seqlens=None")
            return self._context_parallel(x, context_parallel)
        o = nsa_attention(*self.nsa_inputs(x, cu_seqlens), self.config, cu_seqlens=cu_seqlens,
                          backend=self.backend, kernel_options=self.kernel_options)  # [B, T, Hq, Dv]
        return self.o_proj(o.flatten(2))  # [B, T, Hq*Dv] -> [B, T, hidden_size]

    def _context_parallel(self, x: torch.Tensor, layout: ContextParallelLayout) -> torch.Tensor:
        """The forward of this rank's shard x [B, local_len, hidden_size] (nsa.distributed): its queries, keys and
        values at their positions in the whole sequences; one all-gather brings every rank's raw keys/values and
        phi's inputs (un-rotated cmp_src), every rank computes all compressed tokens from the gathered cmp_src (phi
        is small next to the projections; no halo exchange), and its queries attend to the key prefixes of their
        chunks. The backward reduce-scatters the keys' and values' gradients to their owners; the parameters'
        gradients cover this rank's queries only, so sum (or average) them over the group (DDP / FSDP do)."""
        if not isinstance(layout, ContextParallelLayout):
            raise TypeError(f"context_parallel must be an nsa.distributed.ContextParallelLayout, got "
                            f"{type(layout).__name__}")
        if layout.config != self.config:
            raise ValueError("the layout was made for another NSAConfig than this layer's")
        self._check_input(x, None)
        layout.check_local("x", x)
        device_tensors = layout.tensors(x.device)
        q, k_cmp_src, v_cmp_src, k_slc, v_slc, k_swa, v_swa, gates = self._project(x, device_tensors["positions"])
        raw = [k_slc, v_slc] if self.share_kv else [k_slc, v_slc, k_swa, v_swa]
        gathered = gather_rows([k_cmp_src, v_cmp_src, *raw], ["full_slots"] * 2 + ["prefix_slots"] * len(raw), layout)
        index, ids = cmp_block_index(layout.seq_lens, self.config, x.device)  # the whole (packed) batch's blocks
        k_cmp, v_cmp = self._compress(gathered[0][:, index], gathered[1][:, index], ids)  # [1, total_cmp, Hkv, D]
        prefix = device_tensors["cmp_prefix_rows"]
        keys = gathered[2:] if not self.share_kv else gathered[2:] * 2
        o = attend_gathered(q, k_cmp[:, prefix], v_cmp[:, prefix], *keys, gates, layout, self.head_dim ** -0.5,
                            _resolve_backend(self.backend, x.device), self.kernel_options)
        return self.o_proj(o.flatten(2))

    def _token_kv(self, k_slc, v_slc, k_swa, v_swa) -> dict[str, torch.Tensor]:
        """The cache's token buffers (nsa.cache.NSACache.TOKEN_BUFFERS) by name: one pair when share_kv."""
        if self.share_kv:
            return dict(k_slc=k_slc, v_slc=v_slc)
        return dict(k_slc=k_slc, v_slc=v_slc, k_swa=k_swa, v_swa=v_swa)

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None,
                  max_trim: int | None = None) -> NSACache:
        """An empty NSACache for this layer holding up to `capacity` tokens per row.

        dtype/device: given, else the autocast dtype when autocast is on, else the layer's weights'.
        max_trim: how many tokens the cache's trim() may roll back (None: cmp_block).
        """
        dtype, device = default_dtype_device(self.q_proj.weight, dtype, device)
        return NSACache(self.config, batch_size, capacity, self.num_kv_heads, self.head_dim, self.v_head_dim,
                        self.share_kv, dtype, device, max_trim, rope_base=self.rope_base)

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, NSACache):
            raise TypeError(f"cache must be an nsa.cache.NSACache (layer.new_cache(...)), got {type(cache).__name__}")
        made_for = (cache.config, cache.share_kv, tuple(cache.k_slc.shape[2:]), cache.v_slc.shape[3])
        if made_for != (self.config, self.share_kv, (self.num_kv_heads, self.head_dim), self.v_head_dim):
            raise ValueError("the cache was created for a layer with another config, share_kv or head shape; "
                             "create it with layer.new_cache(...)")

    def prefill(self, x: torch.Tensor, cache: NSACache, prompt_lens: list[int] | None = None) -> torch.Tensor:
        """Starts every cache row over with a prompt: x [B, T, hidden_size], right-padded when prompt_lens (row b's
        prompt length, 0 <= prompt_lens[b] <= T; default T for all) is given. Returns the outputs [B, T, hidden_size]
        (the padding positions t >= prompt_lens[b] are meaningless). Runs the whole-sequence op, like forward():
        causality makes each row's first prompt_lens[b] outputs, keys and compressed tokens independent of its padding.
        """
        self._check_cache(cache)
        self._check_input(x, None)
        prompt_lens = cache.begin_prefill(x, prompt_lens)
        x_in, (k_cmp_src, v_cmp_src) = self._whole_sequence(x, None)
        cache.fill(prompt_lens, **self._token_kv(x_in.k_slc, x_in.v_slc, x_in.k_swa, x_in.v_swa))
        cache.fill_cmp(prompt_lens, k_cmp_src, v_cmp_src, x_in.k_cmp, x_in.v_cmp)
        o = nsa_attention(*x_in, self.config, backend=self.backend, kernel_options=self.kernel_options)
        return self.o_proj(o.flatten(2))

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """Appends S new tokens to every cache row: x [B, S, hidden_size] (S >= 1; row b's sit at positions
        cache.cache_seqlens[b] .. + S - 1) -> their outputs [B, S, hidden_size], equal to the whole-sequence forward's.
        Decoding is inference only: no gradient flows (the cache holds detached values anyway).

        Writes their keys/values, makes every compressed token whose last token has now arrived (phi on
        the blocks of cmp_src, RoPE at the block centre, as in nsa_inputs), then runs nsa_decode_attention.
        """
        self._check_cache(cache)
        self._check_input(x, None)
        cache.check_new(x, x.shape[1])
        if self._fused_glue(x, cache):
            q, gates = self._fused_step_glue(x, cache)
        else:
            positions = cache.next_positions(x.shape[1])  # [B, S]
            q, k_cmp_src, v_cmp_src, k_slc, v_slc, k_swa, v_swa, gates = self._project(x, positions)
            cache.write(positions, **self._token_kv(k_slc, v_slc, k_swa, v_swa))
            ids, slots, k_blocks, v_blocks = cache.completed_blocks(k_cmp_src, v_cmp_src)  # [B, C], [B, C, l, Hkv, D]
            k_cmp, v_cmp = self._compress(k_blocks, v_blocks, ids)  # every candidate: static shapes, no host branch
            cache.append(positions, k_cmp_src, v_cmp_src, slots, k_cmp, v_cmp)
        # the host mirror of the lengths is checked instead of reading them back; a row the device still finds out
        # of range (lengths changed behind the mirror, or a replayed CUDA graph) gets NaN and sets error_flag
        o = nsa_decode_attention(q, cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_swa, cache.v_swa,
                                 gates, cache.cache_seqlens, self.config, backend=self.backend,
                                 kernel_options=self.kernel_options, host_seqlens=cache.host_seqlens,
                                 error_flag=cache.error_flag)  # [B, S, Hq, Dv]
        return self.o_proj(o.flatten(2))

    def _fused_glue(self, x: torch.Tensor, cache: NSACache) -> bool:
        """step() takes _fused_step_glue (see the class docstring: fuse_decode_glue)."""
        plain = type(self)._project is NativeSparseAttention._project and \
            type(self)._compress is NativeSparseAttention._compress
        return (self.fuse_decode_glue and plain and cache.rope_base == self.rope_base
                and decode_glue_fused(self.backend, x.device))

    def _fused_step_glue(self, x: torch.Tensor, cache: NSACache) -> tuple[torch.Tensor, torch.Tensor]:
        """What step()'s torch glue does, in two Triton launches around phi (ops/triton/decode_glue.py): x [B, S,
        hidden_size] -> (q [B, S, Hq, Dk] rotated, gates [B, S, Hq, 3]), with the new tokens and every compressed
        token they complete written to the cache and its lengths advanced by S."""
        B, S, _ = x.shape
        Hkv, Dk, Dv = self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self.q_proj(x).view(B, S, self.num_heads, Dk)
        kv = self.kv_proj(x).view(B, S, self.num_kv_sets, Hkv, Dk + Dv)
        cache.check_dtype(kv)
        k_swa, v_swa = (None, None) if self.share_kv else (cache.k_swa, cache.v_swa)
        l, d = self.config.cmp_block, self.config.cmp_stride
        q, k_blocks, v_blocks = decode_append_tokens(q, kv, cache.rope_inv_freq, cache.cache_seqlens, cache.ring_k,
                                                     cache.ring_v, cache.k_slc, cache.v_slc, k_swa, v_swa, l, d)
        # phi on every candidate ([B, C, Hkv, l, D] seen as [B, C, l, Hkv, D]): fixed shapes, no host branch
        k_new, v_new = self.compress_k(k_blocks.transpose(2, 3)), self.compress_v(v_blocks.transpose(2, 3))
        decode_append_compressed(k_new, v_new, kv, cache.rope_inv_freq, cache.cache_seqlens, cache.ring_k,
                                 cache.ring_v, cache.k_cmp, cache.v_cmp, cache.capacity, l, d)
        cache.advance_host(S)
        return q, self._gates(x)
