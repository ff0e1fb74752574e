"""nsa.LanguageModel as a transformers model: NSAConfigHF (model_type "nsa") and NSAForCausalLM.

Importing this module imports transformers (`pip install -e ".[hf]"`) and registers both classes with
AutoConfig / AutoModelForCausalLM, so that save_pretrained / from_pretrained (safetensors) and
AutoModelForCausalLM.from_pretrained work. `import nsa` does not import it.

Decoding through transformers' KV cache is not supported yet: the model runs whole sequences, and
generate() works with use_cache=False (each step re-runs the whole sequence; the config's use_cache is False).
NSA's own cache (self.model.new_cache / prefill / generate) is the fast path.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import NSAConfig
from .model import LanguageModel, ModelConfig

_MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "nsa"]


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
        kwargs.setdefault("use_cache", False)  # no transformers cache yet: generate() re-runs whole sequences
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
    forward(input_ids, labels=None) -> CausalLMOutputWithPast(loss, logits); labels as transformers takes them
    (the same positions as input_ids, shifted inside, -100 ignored)."""

    config_class = NSAConfigHF
    base_model_prefix = "model"
    _tied_weights_keys = ["model.lm_head.weight"]
    _no_split_modules = ["Block"]

    def __init__(self, config: NSAConfigHF):
        super().__init__(config)
        self.model = LanguageModel(config.model_config())  # initializes its own weights
        self.post_init()

    def _init_weights(self, module):
        """Weights missing from a checkpoint get LanguageModel's initialization (the rest is loaded)."""
        LanguageModel._init_weights(module)

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
                inputs_embeds=None, return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if use_cache or (past_key_values is not None and past_key_values.get_seq_length() > 0):
            raise NotImplementedError("NSAForCausalLM: transformers' KV cache is not supported yet; pass "
                                      "use_cache=False (generate(..., use_cache=False)) or use model.model.generate")
        if inputs_embeds is not None:
            raise NotImplementedError("NSAForCausalLM: inputs_embeds is not supported; pass input_ids")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise NotImplementedError("NSAForCausalLM: padding (attention_mask with zeros) is not supported")
        logits, _ = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)


AutoConfig.register("nsa", NSAConfigHF, exist_ok=True)
AutoModelForCausalLM.register(NSAConfigHF, NSAForCausalLM, exist_ok=True)
