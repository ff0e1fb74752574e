"""A model's one-token decoding step captured in a CUDA graph: generate()'s fast path on a GPU.

Eager decoding issues a few hundred small launches per token from Python, so on small models the host, not the
GPU, sets the pace (BENCHMARKS.md). Every decoding step of LanguageModel has static shapes and never reads the
device back (the NSA kernels, the cache's completed_blocks, full attention over the whole capacity), so one step
can be recorded once and replayed for every further token.
"""
from __future__ import annotations

import torch


class DecodeGraph:
    """model(tokens [B, 1], cache=cache) replayed from a CUDA graph: tokens long [B] -> logits [B, vocab].

    Capture it after at least one eager step on this cache (which compiles every kernel for these shapes). Each
    call checks the capacity on the host, copies the tokens into the graph's input, replays the step (it writes
    the caches and advances their cache_seqlens) and advances their host_seqlens. The logits returned live in the
    graph's output buffer: read them before the next call. A replay checks no length on the host: a row whose
    device length is out of range gets NaN outputs and sets the NSA caches' error_flag (captured with the step),
    which cache.check_decode_errors() reads (generate() does, once at the end). Valid for this model, cache and
    batch; the cache's reset() and trim() keep it valid (they only change the lengths), new buffers or weights
    do not.
    """

    def __init__(self, model, cache):
        if not cache.cache_seqlens.is_cuda:
            raise ValueError("DecodeGraph needs a cache on a CUDA device")
        if cache.is_empty:
            raise ValueError("prefill the cache (and run one eager step) before capturing a decoding step")
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(cache.cache_seqlens.shape[0], 1, dtype=torch.long, device=cache.cache_seqlens.device)
        self.graph = torch.cuda.CUDAGraph()
        # Capturing (or failing to) runs only the host side of the step: cache_seqlens does not move, so
        # host_seqlens must come back to what it was.
        with cache.host_seqlens_kept(), torch.no_grad(), torch.cuda.graph(self.graph):
            self.logits = model(self.tokens, cache=cache)[0][:, -1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.check_new(self.tokens, 1)
        self.tokens.copy_(tokens[:, None])
        self.graph.replay()
        self.cache.advance_host(1)
        return self.logits
