"""nsa.LanguageModel as a transformers model: NSAConfigHF (model_type "nsa") and NSAForCausalLM.

Importing this module imports transformers (`pip install -e ".[hf]"`; 4.57 and 5.x) and registers both classes
with AutoConfig / AutoModelForCausalLM, so that save_pretrained / from_pretrained (safetensors) and
AutoModelForCausalLM.from_pretrained work. `import nsa` does not import it.

generate() decodes through nsa's own cache (nsa.hf_cache.NSAHFCache): one prefill of the prompt, then one cached
decoding step per token, with the same tokens as model.model.generate (greedy, and sampled under the same torch
seed). Left-padded batches (attention_mask with leading zeros) decode every row from its own length.
"""
from __future__ import annotations

import dataclasses

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import NSAConfig
from .hf import cu_seqlens_from_position_ids
from .hf_cache import NSAHFCache
from .layer import NativeSparseAttention
from .model import LanguageModel, ModelConfig

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "nsa"]
# the output field (and forward argument) that carries the cache: "past_key_values" up to transformers 5.2x, "cache" after
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class NSAConfigHF(PretrainedConfig):
    """The fields of nsa.ModelConfig (nsa: a dict of nsa.NSAConfig's fields) as a transformers config."""

    model_type = "nsa"

    def __init__(self, nsa: dict | None = None, **kwargs):
        for f in dataclasses.fields(ModelConfig):  # every ModelConfig field, its default when not given
            if f.name != "nsa":
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                value = kwargs.pop(f.name, default)
                setattr(self, f.name, list(value) if isinstance(value, tuple) else value)  # JSON-friendly
        self.nsa = dataclasses.asdict(NSAConfig(**(nsa or {})))  # validated, all fields spelled out
        self.use_cache = kwargs.pop("use_cache", True)  # forward's default outside training: prefill an NSAHFCache
        kwargs["tie_word_embeddings"] = self.tie_embeddings
        super().__init__(**kwargs)
        self.model_config()  # validates the rest

    def model_config(self) -> ModelConfig:
        """The nsa.ModelConfig these fields describe."""
        return ModelConfig(nsa=NSAConfig(**self.nsa), **{name: getattr(self, name) for name in _MODEL_FIELDS})

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs) -> "NSAConfigHF":
        fields = {name: getattr(cfg, name) for name in _MODEL_FIELDS}
        return cls(nsa=dataclasses.asdict(cfg.nsa), **fields, **kwargs)


class NSAForCausalLM(PreTrainedModel, GenerationMixin):
    """nsa.LanguageModel (self.model) behind transformers' causal-LM interface:
    forward(input_ids long [B, T], attention_mask, labels, position_ids, past_key_values / cache, use_cache)
    -> CausalLMOutputWithPast(loss, logits [B, T, vocab], and the NSAHFCache when one is used).

    labels as transformers takes them (the same positions as input_ids, shifted inside, -100 ignored).
    attention_mask [B, T]: each row's ones must be one contiguous run (left or right padding); the run's tokens sit at
    positions 0, 1, ... and the logits of padding columns are meaningless. position_ids: consistent with the mask, or
    (no padding, one row) restarting at 0 for packed sequences, which run as nsa's cu_seqlens.
    Cache: with use_cache (default: the config's use_cache outside training mode, never for packed rows) the first
    call prefills a new NSAHFCache and returns it; calls with a filled cache are decoding steps (input_ids: the new
    tokens; attention_mask only checked for its width, position_ids ignored: the cache knows each row's position).
    """

    config_class = NSAConfigHF
    base_model_prefix = "model"
    # transformers 5 maps each tied weight to its source; 4.x lists them
    _tied_weights_keys = {"model.lm_head.weight": "model.embed.weight"} if TRANSFORMERS_MAJOR >= 5 \
        else ["model.lm_head.weight"]
    _no_split_modules = ["Block"]

    def __init__(self, config: NSAConfigHF):
        super().__init__(config)
        self.model = LanguageModel(config.model_config())  # initializes its own weights
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not make a transformers DynamicCache: forward makes the NSAHFCache itself."""
        return False

    def _init_weights(self, module):
        """Weights missing from a checkpoint get LanguageModel's initialization (the rest is loaded); the NSA layers'
        unsaved gate_mask and gate_fixed are written from their branches and ungated branches."""
        LanguageModel._init_weights(module)
        if isinstance(module, NativeSparseAttention):
            module.reset_gate_mask()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values=None, use_cache: bool | None = None,
                position_ids: torch.Tensor | None = None, inputs_embeds=None, return_dict: bool | None = None,
                cache=None, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is not None:
            raise NotImplementedError("NSAForCausalLM: inputs_embeds is not supported; pass input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("NSAForCausalLM: input_ids must be a long tensor [batch, tokens]")
        if past_key_values is not None and cache is not None:
            raise ValueError("NSAForCausalLM: pass the cache once (past_key_values or cache, not both)")
        nsa_cache = cache if cache is not None else past_key_values
        if nsa_cache is not None and not isinstance(nsa_cache, NSAHFCache):
            raise TypeError(f"NSAForCausalLM decodes through nsa.hf_cache.NSAHFCache, got {type(nsa_cache).__name__}; "
                            "pass no cache (use_cache=True makes one) or NSAHFCache()")
        if nsa_cache is not None and nsa_cache.model_cache is not None:
            _check_step_mask(attention_mask, input_ids, nsa_cache.columns)
            logits = nsa_cache.step(self.model, input_ids)
        else:
            logits, nsa_cache = self._whole_sequences(input_ids, attention_mask, position_ids, use_cache, nsa_cache)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: nsa_cache})

    def _whole_sequences(self, input_ids, attention_mask, position_ids, use_cache, nsa_cache):
        """forward's first call: whole rows, into a new cache (prefill) or none -> (logits, the cache or None)."""
        T = input_ids.shape[1]
        runs = None if attention_mask is None else _token_runs(attention_mask, position_ids, T)
        cu_seqlens = cu_seqlens_from_position_ids(position_ids, T) if position_ids is not None and runs is None else None
        if use_cache is None:
            use_cache = nsa_cache is not None or (self.config.use_cache and not self.training and cu_seqlens is None)
        if use_cache and cu_seqlens is not None:
            raise NotImplementedError("NSAForCausalLM: packed sequences (position_ids restarting at 0) run without a "
                                      "cache; pass use_cache=False")
        if runs is None:
            idx = input_ids
        else:
            starts, host_starts, lengths = runs
            if use_cache and any(s + n != T for s, n in zip(host_starts, lengths)):
                raise ValueError("NSAForCausalLM: a cache continues each row after its last column, so a prompt batch "
                                 "must be padded on the left (tokenizer.padding_side = 'left')")
            idx = _shift_rows(input_ids, starts)  # each row's tokens from column 0: right-padded
        if use_cache:
            nsa_cache = nsa_cache if nsa_cache is not None else NSAHFCache()
            logits = nsa_cache.prefill(self.model, idx, [T] * idx.shape[0] if runs is None else runs[2])
        else:
            nsa_cache = None
            logits = self.model(idx, cu_seqlens=cu_seqlens)[0]
        return (logits if runs is None else _shift_rows(logits, -runs[0])), nsa_cache


def _token_runs(attention_mask: torch.Tensor, position_ids: torch.Tensor | None, T: int):
    """attention_mask [B, T] of 0/1 -> None when it is all ones, else (starts long [B] on its device, starts and
    lengths as lists of B ints) of each row's one contiguous run of ones; ValueError for other masks, or position_ids [B, T] that do not
    count 0, 1, ... along the runs. One host read."""
    if attention_mask.dim() != 2 or attention_mask.shape[1] != T:
        raise ValueError(f"attention_mask must be [batch, {T}] (1: token, 0: padding), got {tuple(attention_mask.shape)}; "
                         "NSA attention is causal by construction and takes no 4D masks")
    mask = attention_mask != 0
    lengths = mask.sum(1)
    starts = mask.long().argmax(1)  # the first one
    cols = torch.arange(T, device=mask.device)
    from_start = cols - starts[:, None]
    checks = [((attention_mask == 0) | (attention_mask == 1)).all(),
              (mask == ((from_start >= 0) & (from_start < lengths[:, None]))).all(),
              (lengths > 0).all(),
              mask.all()]
    if position_ids is not None:
        checks.append(((position_ids.expand_as(mask) - from_start) * mask == 0).all())
    read = torch.cat([torch.stack(checks).long(), lengths, starts]).tolist()
    binary, contiguous, nonempty, full = read[:4]
    if not (binary and contiguous and nonempty):
        raise ValueError("attention_mask must hold 0/1 with the ones of each row in one non-empty contiguous run "
                         "(left or right padding); other masks (holes, empty rows) are not supported")
    if position_ids is not None and not read[4]:
        raise ValueError("position_ids must count 0, 1, ... along each row's run of ones in attention_mask "
                         "(or be left out: NSAForCausalLM derives them from the mask)")
    B, n = mask.shape[0], len(checks)
    return None if full else (starts, read[n + B:], read[n:n + B])


def _shift_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] with row b rotated left by shifts[b] (long [B]): out[b, t] = x[b, (t + shifts[b]) % T]."""
    B, T = x.shape[:2]
    index = (torch.arange(T, device=x.device) + shifts[:, None]) % T  # [B, T]
    return x.gather(1, index.view(B, T, *[1] * (x.dim() - 2)).expand_as(x))


def _check_step_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, columns: int) -> None:
    """A decoding step's attention_mask must be [B, columns + S] (the prompt's mask, then ones, as generate() builds
    it); its values are not read (no host sync in a step): padding was taken from the prefill's mask."""
    want = (input_ids.shape[0], columns + input_ids.shape[1])
    if attention_mask is not None and tuple(attention_mask.shape) != want:
        raise ValueError(f"attention_mask of a decoding step must be {list(want)} (the columns fed so far plus the new "
                         f"tokens), got {list(attention_mask.shape)}")


AutoConfig.register("nsa", NSAConfigHF, exist_ok=True)
AutoModelForCausalLM.register(NSAConfigHF, NSAForCausalLM, exist_ok=True)
