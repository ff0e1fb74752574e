"""Converting a dense Hugging Face transformers model to NSA attention: nsa.convert(model, config).

This module never imports transformers (it works on the model object it is given), so `import nsa` does not
need it; nsa.hf_model (NSAForCausalLM) does.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (and their base models),
any GQA group size. Every decoder layer's self_attn is replaced by an NSAAttentionHF adapter around an
HFNativeSparseAttention (a NativeSparseAttention that keeps the dense layer's numerics):
  - q/k/v/o weights and biases are copied (k/v into every branch's key/value set when share_kv=False);
  - Qwen3's per-head q_norm / k_norm are kept (applied before RoPE, like the original);
  - RoPE is the model's own rotary embedding (a copy of model.model.rotary_emb, so rope_theta and the
    static rope scalings "default", "linear", "llama3" give the same cos/sin as the original), also used to
    rotate the compressed keys at their (fractional) block centres;
  - phi (compress_k / compress_v) starts as exact mean pooling over the block (see init_mean_pooling);
  - gates start at sigmoid(-gate_bias) for the compressed and selected branches and sigmoid(+gate_bias)
    for the sliding window, gate weights zero.
With NSAConfig.window >= T the converted model then reproduces the dense model up to the gate leak
sigmoid(-gate_bias) (about 2 * 2.5e-3 relative for the default 6; gate_bias=40 is exact in float64).
A model whose layers use a sliding window W (Mistral's sliding_window, Qwen2/Qwen3 sliding layers) is reproduced
with NSAConfig.window = W; with another window the converted layers see more (or fewer) tokens than the dense ones.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .config import NSAConfig
from .layer import BRANCHES, NativeSparseAttention
from .ops.types import KernelOptions
from .rope import rotate_half

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")  # static: cos/sin a pure function of the position


class HFNativeSparseAttention(NativeSparseAttention):
    """NativeSparseAttention with a converted dense layer's numerics: a transformers rotary embedding module
    (its cos/sin, at token positions and at compressed-block centres), optional per-head q_norm / k_norm
    (Qwen3) and optional q/k/v/o biases. Everything else (phi, gates, the op, caches) is the parent's."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *, config: NSAConfig,
                 share_kv: bool, rotary: nn.Module, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, qkv_bias: bool = False, o_bias: bool = False,
                 backend: str | None = None, kernel_options: KernelOptions | None = None):
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, config=config, share_kv=share_kv,
                         backend=backend, kernel_options=kernel_options)
        self.rotary = rotary
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        if qkv_bias:
            self.q_proj = nn.Linear(hidden_size, self.q_proj.out_features, bias=True)
            self.kv_proj = nn.Linear(hidden_size, self.kv_proj.out_features, bias=True)
        if o_bias:
            self.o_proj = nn.Linear(self.o_proj.in_features, hidden_size, bias=True)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, D] rotated at positions [T] or [B, T] (possibly fractional), as transformers does it."""
        pos = positions if positions.dim() == 2 else positions[None]
        cos, sin = self.rotary(x, pos)  # [B or 1, T, D] in x's dtype
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        return (x * cos) + (rotate_half(x) * sin)

    def _project(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        Hkv, Dk, Dv = self.num_kv_heads, self.head_dim, self.v_head_dim
        q = self._rope(self.q_norm(self.q_proj(x).view(B, T, self.num_heads, Dk)), positions)
        kv = self.kv_proj(x).view(B, T, self.num_kv_sets, Hkv, Dk + Dv)
        keys, values = kv.split((Dk, Dv), dim=-1)  # [B, T, num_kv_sets, Hkv, D]
        keys = self.k_norm(keys)
        k_cmp_src, k_slc, k_swa = keys.unbind(2) if not self.share_kv else (keys[:, :, 0],) * 3
        v_cmp_src, v_slc, v_swa = values.unbind(2) if not self.share_kv else (values[:, :, 0],) * 3
        k_slc = self._rope(k_slc, positions)
        k_swa = k_slc if self.share_kv else self._rope(k_swa, positions)
        return q, k_cmp_src, v_cmp_src, k_slc, v_slc, k_swa, v_swa, self._gates(x)

    def _compress(self, k_blocks: torch.Tensor, v_blocks: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        centre = ids.double() * self.config.cmp_stride + (self.config.cmp_block - 1) / 2
        k = self.compress_k(k_blocks)
        return self._rope(k, centre.to(k.device)), self.compress_v(v_blocks)


class NSAAttentionHF(nn.Module):
    """Takes a transformers decoder layer's self_attn call and runs NSA attention.

    Called as self_attn(hidden_states, attention_mask=..., position_ids=..., past_key_values=...,
    cache_position=..., position_embeddings=..., **kwargs); returns (output, None) like the dense module
    (no attention weights). NSA is causal by construction, so attention_mask must be None or the plain causal
    mask (padding is refused); positions must be 0 .. T-1 in every row, or, in a batch of one row, restart at 0
    at the start of each packed sequence (transformers' padding-free batches: the sequences then run as nsa's
    packed cu_seqlens); and a cache may only be started (cache_position from 0): decoding through transformers' cache is not supported yet (use_cache=False, or
    nsa's own caches: self_attn.nsa.new_cache / prefill / step).
    """

    def __init__(self, nsa_layer: HFNativeSparseAttention, layer_idx: int):
        super().__init__()
        self.nsa = nsa_layer
        self.layer_idx = layer_idx
        self.is_causal = True

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                past_key_values=None, cache_position=None, position_ids=None, **kwargs):
        B, T, _ = hidden_states.shape
        # transformers 4.x passes cache_position; 5.x only the position_ids of the new tokens (and names the cache
        # `cache` from 5.2x)
        first = cache_position if cache_position is not None else position_ids
        has_cache = past_key_values is not None or kwargs.get("cache") is not None
        start = int(first.flatten()[0]) if has_cache and first is not None and first.numel() else 0
        if start != 0:
            raise NotImplementedError(
                "nsa.convert: decoding through transformers' KV cache is not supported yet for converted models (this "
                f"call continues a sequence from position {start}); run whole sequences (use_cache=False)")
        cu_seqlens = None if position_ids is None else cu_seqlens_from_position_ids(position_ids, T)
        if attention_mask is not None:
            _check_causal_mask(attention_mask, T, cu_seqlens)
        return self.nsa(hidden_states, cu_seqlens=cu_seqlens), None


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, T: int) -> torch.Tensor | None:
    """position_ids long [B, T] or [T] -> None when every row's positions are 0 .. T-1; for one row of sequences packed
    back to back (positions restarting at 0 at each start, transformers' padding-free batches), their cu_seqlens
    int32 [N + 1]; else NotImplementedError. Reads the positions on the host (whole-sequence calls only)."""
    pos = position_ids.expand(1, -1) if position_ids.dim() == 1 else position_ids
    if pos.shape[-1] != T:
        raise NotImplementedError(f"position_ids of shape {tuple(position_ids.shape)} for {T} tokens: NSA attention "
                                  "needs one position per token")
    step_ok = (pos[:, 1:] == pos[:, :-1] + 1) | (pos[:, 1:] == 0)
    if not (bool((pos[:, 0] == 0).all()) and bool(step_ok.all())):
        raise NotImplementedError("NSA attention needs positions (position_ids) 0 .. T-1 in every row, or sequences "
                                  "packed in one row each starting at 0 (no left padding or offsets)")
    if bool(((pos == 0).sum(-1) == 1).all()):
        return None
    if pos.shape[0] != 1:
        raise NotImplementedError("NSA attention: packed position_ids (restarting at 0) need a batch of one row")
    starts = (pos[0] == 0).nonzero().flatten()
    return torch.cat([starts, starts.new_tensor([T])]).to(torch.int32)


def _check_causal_mask(mask: torch.Tensor, T: int, cu_seqlens: torch.Tensor | None = None) -> None:
    """Accepts a 4D mask [B, 1, T, >=T] (bool: True = attend; float: 0 = attend) only if it is the causal mask
    (block-diagonal over packed sequences with cu_seqlens), or a causal sliding-window band (Mistral, Qwen sliding
    layers: NSA's own branches replace it; with NSAConfig.window equal to the model's sliding window the window
    branch is that very attention)."""
    if mask.dim() != 4 or mask.shape[-2] != T or mask.shape[-1] < T:
        raise NotImplementedError(f"nsa.convert: unsupported attention_mask of shape {tuple(mask.shape)}")
    allowed = mask[..., :T] if mask.dtype == torch.bool else mask[..., :T] == 0
    ones = torch.ones(T, T, dtype=torch.bool, device=mask.device)
    width = int(allowed.sum(-1).max())  # the band's width: the most keys a query sees
    expect = ones.tril() & ones.triu(-(width - 1))
    if cu_seqlens is not None:
        seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1, device=mask.device), cu_seqlens.diff().long())
        expect &= seq[:, None] == seq[None, :]
    if not torch.equal(allowed, expect.expand_as(allowed)):
        raise NotImplementedError("nsa.convert: NSA attention is causal over whole rows; attention masks with "
                                  "padding (or other patterns) are not supported, pass unpadded batches")


@torch.no_grad()
def init_mean_pooling(compressor: nn.Module) -> None:
    """Makes phi(block) exactly the mean of the block's l vectors.

    phi(x) = W2 gelu(W1 x + b1) + b2 with hidden width >= 2D. Since gelu(z) - gelu(-z) = z Phi(z) + z Phi(-z) = z
    for the exact GELU, the first D hidden units compute m = mean_j x_j, the next D compute -m, and W2 takes
    their difference: phi(x) = gelu(m) - gelu(-m) = m (up to rounding). The intra-block position embedding is 0.
    The other hidden units keep their random first-layer rows and get zero output columns, so they start
    silent but still receive gradients (an all-zero unit would be stuck).
    """
    first, act, second = compressor.mlp
    if not (isinstance(act, nn.GELU) and act.approximate == "none"):
        raise ValueError("init_mean_pooling needs phi's exact GELU")
    D = second.out_features
    l = first.in_features // D
    if second.in_features < 2 * D:
        raise ValueError(f"init_mean_pooling needs phi's hidden width >= 2 * {D}, got {second.in_features}")
    compressor.pos_emb.zero_()
    avg = torch.eye(D, dtype=first.weight.dtype, device=first.weight.device).repeat(1, l) / l  # [D, l*D]
    first.weight[:D] = avg
    first.weight[D:2 * D] = -avg
    first.bias[:2 * D] = 0
    second.weight.zero_()
    idx = torch.arange(D, device=second.weight.device)
    second.weight[idx, idx] = 1
    second.weight[idx, idx + D] = -1
    second.bias.zero_()


def _decoder_layers(model: nn.Module):
    base = model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model
    if not hasattr(base, "layers") or not hasattr(base, "rotary_emb"):
        raise TypeError(f"nsa.convert: {type(model).__name__} has no decoder layers / rotary embedding where "
                        f"Llama, Mistral, Qwen2 and Qwen3 models keep them (model.model.layers, model.model.rotary_emb)")
    return base


def _check_model(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise TypeError(f"nsa.convert supports the model types {SUPPORTED_MODEL_TYPES}, got {model_type!r} "
                        f"({type(model).__name__})")
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"nsa.convert supports the rope scalings {SUPPORTED_ROPE_TYPES}, got {rope_type!r}: "
                         "its cos/sin depend on more than the position (or are untested here)")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError("nsa.convert: NSA attention has no attention dropout; set config.attention_dropout = 0")


def convert(model: nn.Module, config: NSAConfig = NSAConfig(), *, share_kv: bool = True,
            backend: str | None = None, kernel_options: KernelOptions | None = None,
            gate_bias: float = 6.0) -> nn.Module:
    """Replaces, in place, every attention module of a transformers Llama / Mistral / Qwen2 / Qwen3 model by NSA
    attention initialized from it; returns the model.

    config: the NSA block parameters. With config.window >= the sequence length, the converted model starts
    as the dense one (up to the gate leak sigmoid(-gate_bias), see the module docstring).
    share_kv: one key/value set for the three branches (True), or the dense k/v copied into one set per branch.
    backend: passed to nsa.nsa_attention (None: Triton on CUDA when installed, else the reference); kernel_options
    likewise (an nsa.KernelOptions; None: the library's choices).
    gate_bias: the gates' initial logit magnitude: cmp and slc start at sigmoid(-gate_bias), swa at
    sigmoid(gate_bias). Larger values reproduce the dense model more exactly but saturate the gates: their (and
    through them phi's) gradients shrink like exp(-gate_bias), so the warm-up first spends its steps moving
    the gates out of saturation. 6 (a leak of 0.25% per branch) is a compromise: on the tiny test model stage 1
    lowers the loss from the first steps, where 10 barely moves it; 40 is exact in float64.
    """
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")
    _check_model(model)
    base = _decoder_layers(model)
    hf_config = model.config
    for layer_idx, decoder_layer in enumerate(base.layers):
        attn = decoder_layer.self_attn
        if isinstance(attn, NSAAttentionHF):
            raise ValueError("nsa.convert: the model is already converted")
        decoder_layer.self_attn = NSAAttentionHF(
            _convert_attention(attn, base.rotary_emb, hf_config, config, share_kv, backend, kernel_options,
                               gate_bias), layer_idx)
    return model


@torch.no_grad()
def _convert_attention(attn, rotary, hf_config, config, share_kv, backend, kernel_options,
                       gate_bias) -> HFNativeSparseAttention:
    hidden = attn.q_proj.in_features
    D = attn.head_dim
    Hq, Hkv = attn.q_proj.out_features // D, attn.k_proj.out_features // D
    weight = attn.q_proj.weight
    qkv_bias = attn.q_proj.bias is not None
    if (attn.k_proj.bias is not None) != qkv_bias or (attn.v_proj.bias is not None) != qkv_bias:
        raise ValueError("nsa.convert: q_proj, k_proj and v_proj must all have biases or none")
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    layer = HFNativeSparseAttention(
        hidden, Hq, Hkv, D, config=config, share_kv=share_kv, rotary=nn.Identity(), qkv_bias=qkv_bias,
        o_bias=attn.o_proj.bias is not None, backend=backend, kernel_options=kernel_options)
    layer.to(device=weight.device, dtype=weight.dtype)
    # the dense model's own rotary / norm modules, copied as they are (not cast: transformers keeps their dtypes)
    layer.rotary = copy.deepcopy(rotary)
    if q_norm is not None:
        layer.q_norm, layer.k_norm = copy.deepcopy(q_norm), copy.deepcopy(k_norm)
    layer.q_proj.weight.copy_(attn.q_proj.weight)
    S = layer.num_kv_sets
    kv = layer.kv_proj.weight.view(S, Hkv, 2 * D, hidden)
    kv[:, :, :D] = attn.k_proj.weight.view(Hkv, D, hidden)
    kv[:, :, D:] = attn.v_proj.weight.view(Hkv, D, hidden)
    if qkv_bias:
        layer.q_proj.bias.copy_(attn.q_proj.bias)
        kvb = layer.kv_proj.bias.view(S, Hkv, 2 * D)
        kvb[:, :, :D] = attn.k_proj.bias.view(Hkv, D)
        kvb[:, :, D:] = attn.v_proj.bias.view(Hkv, D)
    layer.o_proj.weight.copy_(attn.o_proj.weight)
    if attn.o_proj.bias is not None:
        layer.o_proj.bias.copy_(attn.o_proj.bias)
    init_mean_pooling(layer.compress_k)
    init_mean_pooling(layer.compress_v)
    layer.gate_proj.weight.zero_()
    layer.gate_proj.bias.view(Hq, len(BRANCHES)).copy_(
        torch.tensor([-gate_bias, -gate_bias, gate_bias], dtype=weight.dtype))
    layer.train(attn.training)
    return layer


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters nsa.convert created, which the dense model had no counterpart for: phi (compress_k,
    compress_v) and the gates (gate_proj) of every converted layer. Stage 1 of the conversion recipe (README,
    "Converting a dense model") trains only these."""
    params = []
    for module in model.modules():
        if isinstance(module, NSAAttentionHF):
            for part in (module.nsa.compress_k, module.nsa.compress_v, module.nsa.gate_proj):
                params.extend(part.parameters())
    if not params:
        raise ValueError("new_parameters: the model has no NSA attention from nsa.convert")
    return params
