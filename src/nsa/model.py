"""A small decoder-only byte-level language model whose attention is NSA or full causal attention.

One readable file in the spirit of nanoGPT: token embedding -> n_layer x [RMSNorm -> attention ->
residual, RMSNorm -> SwiGLU MLP -> residual] -> RMSNorm -> lm head. Positions enter only through
the rotary embedding inside attention.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import NSAConfig
from .layer import NativeSparseAttention
from .rope import apply_rope, positions_from_cu_seqlens

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
    rope_base: float = 10000.0
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"ModelConfig.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"ModelConfig.n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"ModelConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) "
                                 "unless head_dim is given")
            self.head_dim = self.n_embd // self.n_head
        if self.mlp_hidden is None:
            self.mlp_hidden = 32 * math.ceil(8 * self.n_embd / 3 / 32)


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

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        D, G = self.head_dim, self.n_head // self.n_kv_head
        q = self.q_proj(x).view(B, T, self.n_head, D)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, D).unbind(2)
        if cu_seqlens is None:
            positions, mask = torch.arange(T, device=x.device), None
        else:
            positions = positions_from_cu_seqlens(cu_seqlens)
            seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=x.device), cu_seqlens.diff().long())
            mask = (seq[:, None] == seq[None, :]).tril()  # [total, total]: same sequence and u <= t
        q, k = apply_rope(q, positions, self.rope_base), apply_rope(k, positions, self.rope_base)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)  # GQA: head h reads kv head h // G
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_head * D))


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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd)
        if cfg.attention == "nsa":
            self.attn = NativeSparseAttention(cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, config=cfg.nsa,
                                              share_kv=cfg.share_kv, rope_base=cfg.rope_base, backend=cfg.backend)
        else:
            self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg.n_embd, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cu_seqlens=cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """Decoder-only LM: idx long [B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx long [B, T] (or [1, total] packed, with cu_seqlens) -> (logits [B, T, vocab], loss).

        loss: mean cross-entropy against targets long [B, T], None without targets.
        """
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cu_seqlens=cu_seqlens)
        logits = self.lm_head(self.norm(x))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Appends max_new_tokens sampled tokens to idx [B, T] -> [B, T + max_new_tokens].

        No KV cache: every step re-runs the whole sequence. temperature 0 is greedy; top_p keeps the
        smallest set of tokens whose probability reaches top_p (nucleus sampling).
        """
        for _ in range(max_new_tokens):
            logits = self(idx)[0][:, -1].float()  # [B, vocab]
            if temperature == 0:
                next_idx = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                if top_p is not None:
                    sorted_probs, order = probs.sort(dim=-1, descending=True)
                    # drop a token when the tokens more likely than it already reach top_p
                    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
                    probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
                next_idx = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_idx), dim=1)
        return idx
