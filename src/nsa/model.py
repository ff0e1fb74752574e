"""A small decoder-only byte-level language model whose attention is NSA or full causal attention.

One readable file in the spirit of nanoGPT: token embedding -> n_layer x [RMSNorm -> attention ->
residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm head. Positions enter only through
the rotary embedding inside attention.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache, LayerCache, ModelCache, default_dtype_device
from .config import NSAConfig
from .graph import DecodeGraph
from .layer import NativeSparseAttention, check_branches, check_ungated
from .ops.checks import check_cu_seqlens
from .ops.types import KernelOptions
from .rope import positions_from_cu_seqlens, rope_cos_sin, rotate

ATTENTIONS = ("nsa", "full")


@dataclass
class ModelConfig:
    vocab_size: int = 256  # bytes
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 8
    n_kv_head: int = 2
    head_dim: int | None = None  # None: n_embd // n_head
    mlp_hidden: int | None = None  # None: 8/3 * n_embd rounded up to a multiple of 32 (SwiGLU's usual size)
    attention: str = "nsa"  # "nsa" or "full"
    nsa: NSAConfig = field(default_factory=NSAConfig)
    share_kv: bool = False  # NSA only: one key/value projection for all three branches
    backend: str | None = None  # NSA only: passed to nsa.nsa_attention
    # NSA only: the branches whose gates are learned; the others' gates are forced to 0. ("swa",) is the
    # sliding-window-only ablation (attention="nsa" with only the window branch), e.g. --set 'model.branches=["swa"]'
    branches: tuple[str, ...] = ("cmp", "slc", "swa")
    # NSA only: branches (of those on) added with weight exactly 1 instead of a learned gate, e.g. --set
    # 'model.ungated=["cmp"]' (an ablation: the compressed branch, whose scores rank the selected blocks, always counts)
    ungated: tuple[str, ...] = ()
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        self.branches = check_branches(self.branches)
        self.ungated = check_ungated(self.ungated, self.branches)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                                 "unless head_dim is given")
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """The inverse of dataclasses.asdict (the NSA block parameters nested under "nsa"), e.g. from JSON."""
        d = dict(d)
        nsa = d.pop("nsa", {})
        return cls(**d, nsa=nsa if isinstance(nsa, NSAConfig) else NSAConfig(**nsa))


def autocast(device: str | torch.device) -> torch.autocast:
    """bfloat16 autocast on CUDA (tensor cores), a no-op elsewhere: how training and evaluation run the model."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class CausalSelfAttention(nn.Module):
    """Full causal attention with grouped-query heads and RoPE: x [B, T, C] -> [B, T, C].

    softmax(q k^T / sqrt(D) + causal mask) v per head, query head h reading key/value head h // G.
    With cu_seqlens (packed [1, total, C]) the mask is also block-diagonal: nothing crosses sequences.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.rope_base = cfg.rope_base
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.kv_proj = nn.Linear(cfg.n_embd, 2 * cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None,
                  max_trim: int | None = None) -> KVCache:
        """An empty KVCache for this layer holding up to `capacity` tokens per row (dtype/device as in
        NativeSparseAttention.new_cache). max_trim is accepted so that every attention layer has one new_cache
        signature, and ignored: a KVCache can roll back to any length."""
        dtype, device = default_dtype_device(self.q_proj.weight, dtype, device)
        return KVCache(batch_size, capacity, self.n_kv_head, self.head_dim, self.head_dim, dtype, device)

    def _qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, T, C] at positions [T] or [B, T] -> q [B, T, Hq, D], k [B, T, Hkv, D] (both rotated), v."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_dim).unbind(2)
        cos_sin = rope_cos_sin(positions, self.head_dim, self.rope_base, q.dtype)  # once for q and k
        return rotate(q, *cos_sin), rotate(k, *cos_sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [B, S, Hq, D] over k, v [B, L, Hkv, D] with mask bool (True: visible) broadcastable to
        [B, Hq, S, L], or None for the causal mask with S = L -> [B, S, C]."""
        B, S = q.shape[:2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # GQA: head h reads kv head h // G
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_head * self.head_dim))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        if cu_seqlens is None:
            positions, mask = torch.arange(T, device=x.device), None
        else:
            check_cu_seqlens(cu_seqlens, T, x.shape[0], x.device)
            positions = positions_from_cu_seqlens(cu_seqlens)
            seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=x.device), cu_seqlens.diff().long())
            mask = (seq[:, None] == seq[None, :]).tril()  # [total, total]: same sequence and u <= t
        return self._attend(*self._qkv(x, positions), mask)

    def prefill(self, x: torch.Tensor, cache: KVCache, prompt_lens: list[int] | None = None) -> torch.Tensor:
        """Starts the cache over with prompts x [B, T, C] (right-padded to T, prompt_lens as in
        NativeSparseAttention.prefill) -> outputs [B, T, C]."""
        prompt_lens = cache.begin_prefill(x, prompt_lens)
        q, k, v = self._qkv(x, torch.arange(x.shape[1], device=x.device))
        cache.fill(prompt_lens, k=k, v=v)
        return self._attend(q, k, v, None)

    def step(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Appends S new tokens x [B, S, C] to every cache row -> their outputs [B, S, C].

        Attends over the whole capacity, masked by position (static shapes, like the NSA step, so that a step
        can be captured in a CUDA graph): size the cache to what it will hold."""
        cache.check_new(x, x.shape[1])
        positions = cache.next_positions(x.shape[1])  # [B, S]
        q, k, v = self._qkv(x, positions)
        cache.write(positions, k=k, v=v)
        cache.advance(x.shape[1])
        slots = torch.arange(cache.capacity, device=x.device)
        visible = slots <= positions[:, None, :, None]  # [B, 1, S, capacity]: key u <= query p
        return self._attend(q, cache.k, cache.v, visible)


class SwiGLU(nn.Module):
    """MLP(x) = W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, n_embd: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(n_embd, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kernel_options: KernelOptions | None = None):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd)
        if cfg.attention == "nsa":
            self.attn = NativeSparseAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, config=cfg.nsa,
                                              share_kv=cfg.share_kv, rope_base=cfg.rope_base, backend=cfg.backend,
                                              branches=cfg.branches, ungated=cfg.ungated,
                                              kernel_options=kernel_options)
        else:
            self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg.n_embd, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None, cache: LayerCache | None = None,
                prompt_lens: list[int] | None = None, context_parallel=None) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. With a cache (this layer's): prefill when it is empty, else a decoding step.
        context_parallel: x is this rank's shard (nsa.distributed.ContextParallelLayout; NSA attention only)."""
        h = self.attn_norm(x)
        if context_parallel is not None:
            if not isinstance(self.attn, NativeSparseAttention):
                raise ValueError("context parallelism runs NSA attention only (ModelConfig.attention='nsa')")
            h = self.attn(h, context_parallel=context_parallel)
        elif cache is None:
            h = self.attn(h, cu_seqlens=cu_seqlens)
        elif cache.is_empty:
            h = self.attn.prefill(h, cache, prompt_lens)
        else:
            h = self.attn.step(h, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """Decoder-only LM: idx long [B, T] -> logits [B, T, vocab_size].

    kernel_options: an nsa.KernelOptions for every NSA layer's ops (None: the library's choices); launch tuning, not
    part of the model, so not in cfg (nor in checkpoints).
    """

    def __init__(self, cfg: ModelConfig, kernel_options: KernelOptions | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, kernel_options) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: shrink the projections that write into the residual
            if name.endswith(("o_proj.weight", "down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None, device=None,
                  max_trim: int | None = None) -> ModelCache:
        """Empty caches for every layer, each row holding up to `capacity` tokens (NSACache for NSA layers,
        KVCache for full attention), made by the layers' new_cache (dtype/device as there; max_trim: NSA only,
        see NativeSparseAttention.new_cache)."""
        return ModelCache([b.attn.new_cache(batch_size, capacity, dtype, device, max_trim) for b in self.blocks])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                cache: ModelCache | None = None, prompt_lens: list[int] | None = None,
                loss_weights: torch.Tensor | None = None, context_parallel=None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx long [B, T] (or [1, total] packed, with cu_seqlens) -> (logits [B, T, vocab], loss).

        loss: mean cross-entropy against targets long [B, T] (-100: ignored), None without targets; with
        loss_weights float [B, T], the weighted mean sum(w * ce) / sum(w) (give ignored targets weight 0).
        context_parallel (an nsa.distributed.ContextParallelLayout): idx is this rank's shard [B, local_len] of the
        layout's batch and logits are its tokens'; no targets (the mean loss needs the whole batch's count of
        targets: nsa.parallel_train computes each rank's share from the logits).
        With a cache, idx holds new tokens: an empty cache is prefilled with the prompts idx (right-padded,
        row b's length prompt_lens[b], default T), a non-empty one advances every row by T tokens.
        """
        if cache is not None and prompt_lens is not None and not cache.is_empty:
            raise ValueError("prompt_lens is for prefill into an empty cache; a decoding step advances every row by T")
        if context_parallel is not None and (cache is not None or cu_seqlens is not None or targets is not None):
            raise ValueError("context_parallel runs training-style forwards without targets (compute the loss from "
                             "the logits), a cache or cu_seqlens (the layout carries the packing)")
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, cu_seqlens=cu_seqlens, cache=None if cache is None else cache.layers[i],
                      prompt_lens=prompt_lens, context_parallel=context_parallel)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits, None
        if loss_weights is None:
            return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if loss_weights.shape != targets.shape:
            raise ValueError(f"loss_weights must have the targets' shape {tuple(targets.shape)}, "
                             f"got {tuple(loss_weights.shape)}")
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        w = loss_weights.flatten().to(ce.dtype)
        return logits, (w * ce).sum() / w.sum()

    def prefill(self, idx: torch.Tensor, cache: ModelCache, chunk_size: int | None = None) -> torch.Tensor:
        """Starts the cache over with prompts idx long [B, T] -> logits [B, T, vocab].

        The first chunk_size tokens go through the whole-sequence attention, every further chunk of
        chunk_size tokens through one decoding step of S = chunk_size (exact either way); None: one chunk.
        Prompts of different lengths: forward(idx, cache=cache, prompt_lens=...) on an empty cache.
        """
        check_prompt(idx, self.cfg.vocab_size)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None (the whole prompt at once), got {chunk_size!r}")
        cache.reset()
        chunk = idx.shape[1] if chunk_size is None else int(chunk_size)
        return torch.cat([self(idx[:, s:s + chunk], cache=cache)[0] for s in range(0, idx.shape[1], chunk)], dim=1)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_p: float | None = None,
                 stop_tokens: list[int] | None = None, callback=None, use_cache: bool = True,
                 generator: torch.Generator | None = None, cuda_graph: bool | None = None) -> torch.Tensor:
        """Appends up to max_new_tokens tokens to the prompts idx long [B, T] -> [B, T + n], n <= max_new_tokens.

        temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature), restricted
        by top_p to the smallest set of tokens whose probability reaches top_p (nucleus sampling).
        stop_tokens: a row ends with the first one it emits; afterwards it repeats that token (so cut each row
        after its first stop token) and generation ends early once every row has ended (n < max_new_tokens).
        callback(tokens long [B]) is called with each step's new tokens, as soon as they are chosen.
        use_cache: prefill a KV cache with the prompt, then feed one token per step (ModelCache); False
        re-runs the whole sequence every step. Both give the same tokens (up to float rounding in near-ties).
        cuda_graph: replay the one-token step from a CUDA graph (DecodeGraph) after the prefill and one eager
        step; the same tokens as eager steps, without their host overhead. None: on when decoding from a cache on
        a GPU (if capturing fails, a warning and eager steps).
        """
        check_prompt(idx, self.cfg.vocab_size)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        temperature, top_p = check_sampling(temperature, top_p)
        stop_tokens = check_stop_tokens(stop_tokens, self.cfg.vocab_size)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        B = idx.shape[0]
        if cuda_graph and not (use_cache and idx.is_cuda):
            raise ValueError("cuda_graph=True needs use_cache=True and CUDA inputs")
        graph_wanted = use_cache and idx.is_cuda if cuda_graph is None else cuda_graph
        graph = None
        cache = self.new_cache(B, idx.shape[1] + max_new_tokens, device=idx.device) if use_cache else None
        stop = torch.tensor(stop_tokens, dtype=torch.long, device=idx.device)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        ended_with = torch.zeros(B, dtype=torch.long, device=idx.device)  # the stop token that ended each row
        new = idx  # the tokens not yet fed to the model
        for i in range(max_new_tokens):
            if graph_wanted and i == 2:  # after the prefill and one eager step, which compiled every kernel
                graph = self._capture_step(cache, required=bool(cuda_graph))
            if graph is not None:
                logits = graph(new[:, 0]).float()
            else:
                logits = (self(new, cache=cache) if use_cache else self(idx))[0][:, -1].float()  # [B, vocab]
            next_idx = torch.where(done, ended_with, sample(logits, temperature, top_p, generator))
            ends = torch.isin(next_idx, stop) & ~done
            ended_with, done = torch.where(ends, next_idx, ended_with), done | ends
            idx, new = torch.cat((idx, next_idx[:, None]), dim=1), next_idx[:, None]
            if callback is not None:
                callback(next_idx)
            if stop.numel() and done.all():  # reads `done` back: only when a row can end early
                break
        if cache is not None:
            cache.check_decode_errors()  # one read of the steps' error flags (set only if a length went out of range)
        return idx

    def _capture_step(self, cache: ModelCache, required: bool) -> DecodeGraph | None:
        """generate()'s decoding step as a DecodeGraph; None with a warning when capturing fails and not required."""
        try:
            return DecodeGraph(self, cache)
        except RuntimeError as e:
            if required:
                raise
            warnings.warn(f"nsa: could not capture the decoding step in a CUDA graph ({str(e).splitlines()[0]}); "
                          "decoding with eager steps, which are host-bound on small models")
            return None


def sample(logits: torch.Tensor, temperature: float, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens long [B] from logits [B, vocab]: argmax if temperature == 0, else a draw from
    softmax(logits / temperature) restricted to the top_p nucleus."""
    temperature, top_p = check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens more likely than it already reach top_p
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(temperature, top_p) -> tuple[float, float | None]:
    """Validates the sampling arguments (host-side, no device sync); returns them as Python floats."""
    if not _is_real(temperature) or not 0 <= temperature < math.inf:  # NaN fails both comparisons
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] or None (no nucleus), got {top_p!r}")
    return float(temperature), None if top_p is None else float(top_p)


def check_stop_tokens(stop_tokens, vocab_size: int) -> list[int]:
    """stop_tokens (None or an iterable of token ids in [0, vocab_size)) as a list of ints."""
    if stop_tokens is None:
        return []
    if isinstance(stop_tokens, (str, bytes, torch.Tensor)) or not hasattr(stop_tokens, "__iter__"):
        raise TypeError(f"stop_tokens must be None or an iterable of int token ids (e.g. [10]), "
                        f"got {type(stop_tokens).__name__}; for a tensor pass stop_tokens.tolist()")
    tokens = list(stop_tokens)
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
            raise ValueError(f"stop_tokens must hold int token ids in [0, {vocab_size}), got {t!r}")
    return [int(t) for t in tokens]


def check_prompt(idx, vocab_size: int) -> None:
    """idx is an integer tensor [B, T] with B, T >= 1 and token ids in [0, vocab_size) (reads idx once: call it
    before generation, not inside a decoding step)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"idx (the prompt) must be an int64 tensor [B, T] of token ids, got "
                        f"{idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__}; use idx.long()")
    if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx (the prompt) must have shape [B, T] with B, T >= 1, got {tuple(idx.shape)}; "
                         "a single prompt [T] becomes [1, T] with idx[None]")
    low, high = torch.stack(torch.aminmax(idx)).tolist()  # one read of the device
    if low < 0 or high >= vocab_size:
        raise ValueError(f"idx (the prompt) must hold token ids in [0, {vocab_size}), got values in [{low}, {high}]")
