"""NSAHFCache: a transformers Cache that holds nsa's own decoding cache (nsa.cache.ModelCache).

NSAForCausalLM (nsa.hf_model) makes one when it is called with use_cache and no cache, e.g. by generate(): the
prompt is prefilled once through LanguageModel's whole-sequence prefill, every further call is a cached decoding
step (LanguageModel.forward with a non-empty cache), never a re-run of the sequence. Importing this module imports
transformers.

transformers counts a sequence in columns (left padding included); nsa's cache holds each row's real tokens only,
at positions 0, 1, ...: a left-padded prompt enters the cache right-padded (LanguageModel's prompt_lens).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .cache import ModelCache


class NSAHFCache(Cache):
    """nsa's ModelCache behind transformers' Cache interface, made on the first (prefill) call.

    capacity: tokens per row allocated at prefill (None: twice the prompt); a step that needs more doubles it
    (ModelCache.grow: one copy of the buffers, host-side lengths only, no device read).
    get_seq_length() is the number of columns fed so far (prompt width, padding included, plus steps), which is
    what transformers' generate expects. Beam search and assisted decoding (reorder, crop, batch repeats) are
    refused.
    """

    def __init__(self, capacity: int | None = None):
        super().__init__(layers=[])
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity must be a positive int or None (twice the prompt), got {capacity!r}")
        self.initial_capacity = capacity
        self.model_cache: ModelCache | None = None
        self.columns = 0

    def __repr__(self):
        held = None if self.model_cache is None else self.model_cache.host_seqlens
        return f"NSAHFCache(columns={self.columns}, tokens per row={held})"

    def __len__(self):
        return 0 if self.model_cache is None else len(self.model_cache.layers)

    @property
    def is_compileable(self) -> bool:
        return False

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1  # grows on demand

    def prefill(self, model, idx: torch.Tensor, prompt_lens: list[int]) -> torch.Tensor:
        """Allocates nsa's cache for model (an nsa.LanguageModel) and prefills it with the right-padded prompts
        idx long [B, T] of lengths prompt_lens -> logits [B, T, vocab] (meaningless past prompt_lens[b])."""
        if self.model_cache is not None:
            raise ValueError("NSAHFCache: this cache is already filled; pass a new one (or none) for a new prompt")
        B, T = idx.shape
        capacity = max(T, self.initial_capacity or 2 * T)
        self.model_cache = model.new_cache(B, capacity, device=idx.device)
        logits = model(idx, cache=self.model_cache, prompt_lens=prompt_lens)[0]
        self.columns = T
        return logits

    def step(self, model, idx: torch.Tensor) -> torch.Tensor:
        """One decoding step: appends idx long [B, S] to every row -> logits [B, S, vocab]. Grows the cache first
        when a row would not fit (a host-side check)."""
        if self.model_cache is None:
            raise ValueError("NSAHFCache: a decoding step before the prefill")
        needed = max(self.model_cache.host_seqlens) + idx.shape[1]
        if needed > self.model_cache.capacity:
            self.model_cache.grow(max(needed, 2 * self.model_cache.capacity))
        logits = model(idx, cache=self.model_cache)[0]
        self.columns += idx.shape[1]
        return logits

    def reset(self):
        """Drops the contents: the next call prefills again."""
        self.model_cache, self.columns = None, 0

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("NSAHFCache supports greedy and sampled generation (num_beams=1, no assistant "
                                  "model): beam search and assisted decoding would reorder or crop it")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse
