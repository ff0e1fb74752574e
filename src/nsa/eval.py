"""Passkey retrieval: can the model find a 5-digit key stated once, deep inside filler text?

A prompt of exactly `length` bytes (tokens: the models here are byte-level) is filler from validation text with
the needle " The passkey is 48213. Remember it. " inserted at a relative depth (0: at the start, 1: right before
the question), ending with the fixed question " What is the passkey? The passkey is". The model answers greedily
(generate with temperature 0); the answer is right when its first run of digits, after leading spaces, is
exactly the key (`score_answer`). `passkey_grid` runs N trials per (length, depth) cell, each with its own
random key and filler, and reports the accuracy of every cell; `plot_heatmap` draws them. For NSA models it
also reports, per layer, how often the selection blocks holding the key's digits are selected at the answering
position, against chance, and the mean gate of each branch (`selection_stats`).

The training mix (`passkey_windows`, TrainConfig.passkey_fraction) puts the same pattern into training windows,
followed by the answer (ANSWER), so that the model is trained to retrieve the key; TrainConfig.passkey_needles > 1
puts several needle-question-answer segments into one window (more retrieval examples per window).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import NSAConfig
from .layer import BRANCHES, NativeSparseAttention
from .model import LanguageModel, autocast
from .ops import select_blocks
from .ops.checks import check_scale
from .ops.reference import cmp_attention_weights

NEEDLE = " The passkey is {key}. Remember it. "
QUESTION = " What is the passkey? The passkey is"
ANSWER = " {key}."  # what follows QUESTION in a training window of the passkey mix
# what the model writes after QUESTION before the key's first digit: the position after it is the one that retrieves
ANSWER_PREFIX = ANSWER[:ANSWER.index("{key}")]
KEY_DIGITS = 5


@dataclass
class PasskeyPrompt:
    tokens: torch.Tensor  # long [length]: the prompt's bytes
    key: str  # the 5 digits
    needle_start: int  # where the needle starts (in bytes)


def make_prompt(filler: torch.Tensor, length: int, depth: float, key: str, offset: int = 0) -> PasskeyPrompt:
    """A prompt of exactly `length` bytes: filler[offset:] cut to fit, the needle with `key` at relative
    depth (0 .. 1) of the filler, then QUESTION. filler: uint8/long [N] bytes (wrapped around if short)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key).encode()
    question = QUESTION.encode()
    n = length - len(needle) - len(question)
    if n < 0:
        raise ValueError(f"length {length} is too short for the needle and the question "
                         f"({len(needle) + len(question)} bytes)")
    if len(filler) == 0:
        raise ValueError("the filler text is empty")
    index = (offset + torch.arange(n)) % len(filler)
    text = filler[index].long()
    at = round(depth * n)
    tokens = torch.cat([text[:at], torch.tensor(list(needle)), text[at:], torch.tensor(list(question))])
    return PasskeyPrompt(tokens, key, at)


def passkey_min_length() -> int:
    """The fewest bytes a window of the passkey mix needs: the needle, the question and the answer."""
    key = "0" * KEY_DIGITS
    return len(NEEDLE.format(key=key)) + len(QUESTION) + len(ANSWER.format(key=key))


def passkey_windows(windows: torch.Tensor, fraction: float, generator: torch.Generator | None, needles: int = 1
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training mix: each window of long [B, N] bytes becomes, with probability `fraction`, a passkey sample
    made of its own bytes, cut into k consecutive segments (k = 1 when needles = 1, else uniform in 1..needles,
    segment lengths random, each at least passkey_min_length()); each segment becomes make_prompt(segment,
    its length - len(answer), depth, key) then ANSWER, with depth uniform in [0, 1] and a random 5-digit key, so
    every question asks for the most recent needle's key and the window's last bytes answer the last question.

    Draws from generator whatever the outcome (the stream stays aligned for exact resume): B + 2 * B * needles
    numbers, and B + B * needles more when needles > 1.
    Returns (the windows long [B, N], needle_start long [B]: where row b's first needle starts, -1 in plain
    rows, answer_mask bool [B, N]: True on the bytes of every ANSWER).
    """
    B, N = windows.shape
    if not isinstance(needles, int) or needles < 1:
        raise ValueError(f"needles must be a positive int, got {needles!r}")
    if N < needles * passkey_min_length():
        raise ValueError(f"windows of {N} bytes are too short for the passkey mix with {needles} needle(s) (at least "
                         f"{needles} x {passkey_min_length()}: needle, question and answer); raise train.seq_len, "
                         "lower train.passkey_needles or set train.passkey_fraction=0")
    mixed = torch.rand(B, generator=generator) < fraction
    depths = torch.rand(B, needles, generator=generator)
    keys = torch.randint(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS, (B, needles), generator=generator)
    counts, shares = torch.ones(B, dtype=torch.long), torch.ones(B, needles)
    if needles > 1:
        counts = torch.randint(1, needles + 1, (B,), generator=generator)
        shares = torch.rand(B, needles, generator=generator) + 1e-3
    windows = windows.clone()
    needle_start = torch.full((B,), -1, dtype=torch.long)
    answer_mask = torch.zeros(B, N, dtype=torch.bool)
    for b in mixed.nonzero()[:, 0].tolist():
        k = counts[b].item()
        share = shares[b, :k] / shares[b, :k].sum()
        lengths = passkey_min_length() + (share * (N - k * passkey_min_length())).long()
        lengths[-1] = N - lengths[:-1].sum()
        row, at = [], 0
        for j, length in enumerate(lengths.tolist()):
            key = str(keys[b, j].item())
            answer = torch.tensor(list(ANSWER.format(key=key).encode()))
            prompt = make_prompt(windows[b, at:at + length], length - len(answer), depths[b, j].item(), key)
            row += [prompt.tokens, answer]
            if j == 0:
                needle_start[b] = prompt.needle_start
            answer_mask[b, at + length - len(answer):at + length] = True
            at += length
        windows[b] = torch.cat(row)
    return windows, needle_start, answer_mask


def answer_digits(answer: str) -> str:
    """The answer's first run of digits after leading whitespace ("" when it starts otherwise)."""
    m = re.match(r"\s*(\d+)", answer)
    return "" if m is None else m.group(1)


def score_answer(answer: str, key: str) -> bool:
    """True when the answer's digits (answer_digits) are exactly key."""
    return answer_digits(answer) == key


def digits_right(answer: str, key: str) -> int:
    """How many of key's digits the answer's digits (answer_digits) have at their places: partial retrieval, which
    score_answer counts as wrong (a uniform guess gets about a tenth of them)."""
    return sum(a == k for a, k in zip(answer_digits(answer), key))


def block_chance(block: int, t: int, config: NSAConfig) -> float:
    """The chance that block `block` is among those selected for the query at position t when the free slots are
    filled uniformly at random (SPEC.md, branch 2): 1 for a forced block (J(t), J(t) - 1, 0, in that order while
    the n slots last) or when every candidate fits; else the free slots over the candidates left."""
    last = t // config.slc_block
    n = config.num_selected
    if last + 1 <= n:
        return 1.0
    forced = list(dict.fromkeys(j for j in (last, last - 1, 0) if j >= 0))[:n]
    if block in forced:
        return 1.0
    return (n - len(forced)) / (last + 1 - len(forced))


def key_positions(prompt: PasskeyPrompt) -> torch.Tensor:
    """Where the key's digits sit in the prompt: long [KEY_DIGITS]."""
    return prompt.needle_start + NEEDLE.index("{key}") + torch.arange(len(prompt.key))


@torch.no_grad()
def layer_selections(model: LanguageModel, idx: torch.Tensor
                     ) -> list[tuple[NSAConfig, torch.Tensor, dict, torch.Tensor]]:
    """What each NSA layer of the model selects on inputs idx long [B, T] (none for full attention: []): per layer,
    (its NSAConfig, block ids long [B, T, Hkv, n] from nsa.select_blocks on the layer's own inputs, each gate's mean
    over rows, positions and heads {"cmp", "slc", "swa"}, the compressed attention weights of the last position
    float32 [B, 1, Hq, Tc] (the layer's scale, the default))."""
    layers = [block.attn for block in model.blocks if isinstance(block.attn, NativeSparseAttention)]
    out = []

    def record(layer, args, output):
        inputs = layer.nsa_inputs(args[0])
        ids = select_blocks(inputs.q, inputs.k_cmp, layer.config, backend=layer.backend)
        gates = inputs.gates.float().mean(dim=(0, 1, 2)).tolist()  # [3]
        last = torch.tensor([idx.shape[1] - 1])
        with torch.autocast(idx.device.type, enabled=False):  # float32 scores, not autocast's bfloat16
            p_last = cmp_attention_weights(inputs.q[:, -1:], inputs.k_cmp, last, layer.config,
                                           check_scale(None, inputs.q.shape[-1]))
        out.append((layer.config, ids, dict(zip(BRANCHES, gates)), p_last))

    hooks = [layer.register_forward_hook(record) for layer in layers]
    try:
        if layers:
            with autocast(idx.device):
                model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return out


def cmp_tokens_holding(positions: torch.Tensor, num_tokens: int, config: NSAConfig) -> torch.Tensor:
    """Which of the first num_tokens compressed tokens (token i covers bytes [i * d, i * d + l)) cover any of the
    positions long [B, K] -> bool [B, num_tokens]."""
    starts = torch.arange(num_tokens, device=positions.device) * config.cmp_stride
    return ((starts[None, :, None] <= positions[:, None, :])
            & (positions[:, None, :] < starts[None, :, None] + config.cmp_block)).any(-1)


def selection_stats(model: LanguageModel, idx: torch.Tensor, key_pos: torch.Tensor) -> list[dict]:
    """What each NSA layer of the model does on prompts idx long [B, T] whose key digits sit at key_pos long [B, K].

    The prompts get ANSWER_PREFIX appended (what the model writes first, " "), and everything is measured at the
    position after it, the one whose output is the key's first digit: the last prompt position only predicts the
    prefix, which needs no lookup.
    Per NSA layer (none for full attention: []): the blocks each KV head group selects at that position, from
    layer_selections; "hits" counts the (prompt, group, digit) triples whose digit's block is selected, out of
    "items"; "hit_rate" = hits / items, "chance" its mean under a random choice of the free slots (block_chance of
    each digit's block at that position: a digit in a forced block counts 1);
    "gate_mean" {"cmp", "slc", "swa"}: each gate's mean over prompts, positions, heads;
    "key_attention" [Hq]: per query head, the compressed attention weight of that position on the compressed
    tokens that hold a key digit (mean over prompts), and "key_attention_uniform" what spreading the weight evenly
    over the tokens it sees would give: a head that looks the key up scores far above it, one that averages at it;
    "cmp_entropy" [Hq]: per query head, the entropy (nats) of those weights (mean over prompts), against
    "cmp_entropy_uniform" = log(number of tokens seen), the entropy of an even spread.
    """
    prefix = torch.tensor(list(ANSWER_PREFIX.encode()), dtype=idx.dtype, device=idx.device)
    idx = torch.cat([idx, prefix.expand(idx.shape[0], -1)], dim=1)
    stats = []
    T, key_pos = idx.shape[1], key_pos.cpu()
    for config, ids, gate_mean, p_last in layer_selections(model, idx):
        ids = ids[:, -1]  # [B, Hkv, n]
        blocks = key_pos // config.slc_block  # [B, K]
        hit = (ids[:, :, None, :] == blocks.to(ids.device)[:, None, :, None]).any(-1)  # [B, Hkv, K]
        chance = sum(block_chance(b, T - 1, config) for b in blocks.flatten().tolist()) / blocks.numel()
        seen = p_last.shape[-1]  # the last position sees every one of the Tc compressed tokens
        holds_key = cmp_tokens_holding(key_pos, seen, config)  # [B, Tc]
        p_last = p_last[:, 0].cpu()  # [B, Hq, Tc]
        weight = (p_last * holds_key[:, None, :]).sum(-1)  # [B, Hq]
        entropy = -torch.xlogy(p_last, p_last).sum(-1)  # [B, Hq]
        stats.append({"hits": int(hit.sum()), "items": hit.numel(), "hit_rate": hit.float().mean().item(),
                      "chance": chance, "gate_mean": gate_mean, "key_attention": weight.mean(0).tolist(),
                      "key_attention_uniform": (holds_key.sum(-1) / max(1, seen)).float().mean().item(),
                      "cmp_entropy": entropy.mean(0).tolist(), "cmp_entropy_uniform": math.log(max(1, seen))})
    return stats


def copy_source_hits(model: LanguageModel, idx: torch.Tensor, n: int | None = None,
                     sources: torch.Tensor | None = None) -> list[dict]:
    """What each NSA layer selects on sequences idx long [B, T] where queries copy earlier tokens (none for full
    attention: []). sources long [B, T]: for the query at t, the position of the token it should output (-1: a
    query that copies nothing); default: a chunk of n tokens written twice (n = T // 2 unless given; T may stop
    short of the second copy's end), where the query at n + i predicts token n + i + 1, a repeat of token i + 1.
    Per layer, "hit_rate" is the share of (sequence, copying query, KV group) whose selected blocks hold the source
    token, "chance" its mean under a random choice of the free slots (block_chance of each query's source block: 1
    where that block is forced), and "gate_mean" each gate's mean (as layer_selections)."""
    B, T = idx.shape
    if sources is None:
        n = T // 2 if n is None else n
        t = torch.arange(T)
        sources = torch.where(t >= n, t - n + 1, -1).expand(B, T)
    if sources.shape != idx.shape:
        raise ValueError(f"sources must have idx's shape {tuple(idx.shape)}, got {tuple(sources.shape)}")
    sources = sources.cpu()
    copying = sources >= 0
    stats = []
    for config, ids, gate_mean, _ in layer_selections(model, idx):  # ids [B, T, Hkv, slots]
        blocks = sources.clamp(min=0) // config.slc_block  # the block of each query's source token
        hit = (ids.cpu() == blocks[:, :, None, None]).any(-1)[copying]  # [copying queries, Hkv]
        pairs = [(int(b), int(t)) for b, t in zip(blocks[copying], copying.nonzero()[:, 1])]
        chances = {pair: block_chance(*pair, config) for pair in set(pairs)}
        stats.append(dict(hit_rate=hit.float().mean().item(), chance=sum(chances[p] for p in pairs) / len(pairs),
                          gate_mean=gate_mean))
    return stats


def summarize_selection(cells: list[dict]) -> list[dict]:
    """The cells' per-layer selection_stats pooled: hits and items summed; chance, key_attention(_uniform) and
    cmp_entropy(_uniform) weighted by items (so by prompts); gate_mean averaged over the cells -> one dict per NSA
    layer (selection_stats' keys)."""
    pooled = []
    for per_cell in zip(*(cell["nsa_layers"] for cell in cells)):
        hits, items = sum(s["hits"] for s in per_cell), sum(s["items"] for s in per_cell)

        def weighted(values):
            return sum(v * s["items"] for v, s in zip(values, per_cell)) / items
        pooled.append({"hits": hits, "items": items, "hit_rate": hits / items,
                       "chance": weighted(s["chance"] for s in per_cell),
                       "gate_mean": {b: sum(s["gate_mean"][b] for s in per_cell) / len(per_cell) for b in BRANCHES},
                       "key_attention": [weighted(head) for head in zip(*(s["key_attention"] for s in per_cell))],
                       "key_attention_uniform": weighted(s["key_attention_uniform"] for s in per_cell),
                       "cmp_entropy": [weighted(head) for head in zip(*(s["cmp_entropy"] for s in per_cell))],
                       "cmp_entropy_uniform": weighted(s["cmp_entropy_uniform"] for s in per_cell)})
    return pooled


@torch.no_grad()
def passkey_grid(model: LanguageModel, filler: torch.Tensor, lengths: list[int], depths: list[float],
                 trials: int = 5, seed: int = 0, progress=None) -> dict:
    """Accuracy of the passkey test per (length, depth) cell, `trials` prompts each (one batch per cell).

    Returns {"lengths", "depths", "trials", "accuracy": [[per depth] per length], "digit_accuracy" (the share of
    key digits answered at their places over the grid, digits_right), "cells": [{"length", "depth", "correct",
    "digits_right", "keys", "answers"}, ...]}. NSA models add selection_stats to each cell ("nsa_layers") and pooled
    over the grid (results["nsa_layers"], summarize_selection). progress(cell) is called after each cell, if given.
    """
    rng = random.Random(seed)
    device = next(model.parameters()).device
    accuracy, cells = [], []
    for length in lengths:
        row = []
        for depth in depths:
            prompts = [make_prompt(filler, length, depth, str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS)),
                                   rng.randrange(max(1, len(filler)))) for _ in range(trials)]
            idx = torch.stack([p.tokens for p in prompts]).to(device)
            with autocast(device):
                out = model.generate(idx, KEY_DIGITS + 2, temperature=0)  # a space, 5 digits, one more
            answers = [bytes(row_out[length:].tolist()).decode("utf-8", errors="replace") for row_out in out.cpu()]
            correct = [score_answer(a, p.key) for a, p in zip(answers, prompts)]
            cell = {"length": length, "depth": depth, "correct": sum(correct), "trials": trials,
                    "digits_right": sum(digits_right(a, p.key) for a, p in zip(answers, prompts)),
                    "keys": [p.key for p in prompts], "answers": answers}
            stats = selection_stats(model, idx, torch.stack([key_positions(p) for p in prompts]))
            if stats:
                cell["nsa_layers"] = stats
            cells.append(cell)
            row.append(sum(correct) / trials)
            if progress is not None:
                progress(cell)
        accuracy.append(row)
    digits = sum(len(k) for cell in cells for k in cell["keys"])
    results = {"lengths": list(lengths), "depths": list(depths), "trials": trials, "accuracy": accuracy,
               "digit_accuracy": sum(cell["digits_right"] for cell in cells) / max(1, digits), "cells": cells}
    if cells and "nsa_layers" in cells[0]:
        results["nsa_layers"] = summarize_selection(cells)
    return results


def plot_heatmap(results: dict, path: str | os.PathLike, title: str = "passkey retrieval accuracy") -> Path:
    """A heatmap PNG of results["accuracy"]: depth (rows) x context length (columns)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = torch.tensor(results["accuracy"]).T  # [depths, lengths]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * acc.shape[1], 1.0 + 0.6 * acc.shape[0]))
    im = ax.imshow(acc.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(acc.shape[1]), [str(n) for n in results["lengths"]])
    ax.set_yticks(range(acc.shape[0]), [f"{d:g}" for d in results["depths"]])
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set(xlabel="context length (bytes)", ylabel="needle depth", title=title)
    fig.colorbar(im, ax=ax, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


@torch.no_grad()
def repeat_loss(model: LanguageModel, text: torch.Tensor, lengths: list[int], trials: int = 8, seed: int = 0) -> dict:
    """In-context copying at a distance, no training for it needed: each prompt is a random chunk c of n = length // 2
    bytes of text (uint8 [N]), twice (c + c). The model's loss on the second copy's bytes 1..n-1, against its loss on
    the same bytes in the first copy, shows how much it retrieves from n bytes back: a window-only model with
    window w <= n cannot see the first copy and predicts both alike; full attention can.

    Returns {"lengths", "trials", "first": [mean loss in nats/byte per length], "second": [...], "nsa_layers": [per
    length, copy_source_hits of the prompts: does each NSA layer select the block to copy from? ([] for full
    attention)]}."""
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    first, second, layers = [], [], []
    for length in lengths:
        n = length // 2
        if n < 2 or len(text) < n:
            raise ValueError(f"length {length} must be >= 4 and at most twice the text's {len(text)} bytes")
        chunks = [text[s:s + n].long() for s in (rng.randrange(len(text) - n + 1) for _ in range(trials))]
        idx = torch.stack([torch.cat([c, c]) for c in chunks]).to(device)  # [trials, 2n]
        with autocast(device):
            logits = model(idx)[0]
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), idx[:, 1:].flatten(), reduction="none")
        loss = loss.view(trials, 2 * n - 1)  # loss[:, t]: predicting byte t + 1
        first.append(loss[:, :n - 1].mean().item())  # bytes 1 .. n-1 of the first copy
        second.append(loss[:, n:].mean().item())  # the same bytes of the second copy
        layers.append(copy_source_hits(model, idx) if isinstance(model, LanguageModel) else [])
    model.train(was_training)
    return {"lengths": list(lengths), "trials": trials, "first": first, "second": second, "nsa_layers": layers}


def save_results(results: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path
