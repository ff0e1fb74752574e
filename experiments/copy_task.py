"""Retrieval beyond the window on a synthetic copy task: can NSA's compressed and selected branches fetch tokens
that the sliding window cannot see? Small enough for a CPU (minutes), so it runs where the GPU time is short.

Each sequence is H random symbols (an alphabet of A) written twice: x[0:H] then the same x[0:H] again (T = 2H). The
loss counts only the second copy's predictions (targets H+1 .. 2H-1), which a model can get right only by looking
H - 1 tokens back: with the window w < H - 1 the window branch alone cannot, so window-only stays at chance
(log A nats) while full attention learns to copy (an induction mechanism: previous-token head, then match). NSA has
to reach the first copy through its selected blocks (ranked by the compressed scores) or its compressed tokens.
--segment S shuffles the second copy: it is the first copy's H / S segments of S symbols in a random order (per
sequence), so the offset to the source changes from segment to segment and a model must find it by content (match
the symbols so far, as an induction head does) instead of at the fixed distance H - 1 that the plain copy allows;
a segment's first symbol is unpredictable and not counted. --gap G puts G random symbols between the two parts
(T = 2H + G): with G >= the window, every counted source lies outside the window.
The models share the size, data, steps and schedule: attention "nsa", "swa" (NSA with the compressed and selected
gates forced to 0) and "full"; --models nsa-ungated adds NSA with its compressed branch ungated (weight 1).

Reported per model: the second copy's loss (nats/token) on held-out sequences over training; at the end, per NSA
layer, how often the block holding the token to copy (position i + 1 for the query at H + i) is among the group's
selected blocks (selection hit rate) against chance (n / candidate blocks), and the gates' means.

    python experiments/copy_task.py --steps 600 --out experiments/results/copy-task.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

import nsa
from nsa.eval import copy_source_hits

MODELS = {"nsa": dict(attention="nsa"), "swa": dict(attention="nsa", branches=("swa",)), "full": dict(attention="full"),
          "nsa-ungated": dict(attention="nsa", ungated=("cmp",))}  # the compressed branch added with weight 1


def copy_batch(batch: int, half: int, alphabet: int, gen: torch.Generator, segment: int | None = None,
               gap: int = 0) -> tuple[torch.Tensor, ...]:
    """(inputs long [B, T - 1], targets long [B, T - 1], loss weights [B, T - 1], sources long [B, T - 1]) of B
    sequences x, gap random symbols, then x's segments of `segment` symbols (default: all of x, one segment) in a
    random order (T = 2 * half + gap). Target j (= seq[j + 1]) weighs 1 when it is a second-part symbol other than a
    segment's first; sources[j] is then the position in x of the symbol it repeats, else -1."""
    segment = half if segment is None else segment
    if half % segment:
        raise ValueError(f"segment ({segment}) must divide half ({half})")
    x = torch.randint(0, alphabet, (batch, half), generator=gen)
    filler = torch.randint(0, alphabet, (batch, gap), generator=gen)
    # the plain copy (one segment) draws nothing for its order, so its batches are those of the recorded runs
    order = torch.rand(batch, half // segment, generator=gen).argsort(dim=1) if segment < half else \
        torch.zeros(batch, 1, dtype=torch.long)
    src = (order[:, :, None] * segment + torch.arange(segment)).flatten(1)  # [B, half]: second part's x positions
    seq = torch.cat((x, filler, x.gather(1, src)), dim=1)
    start = half + gap  # the second part's first position
    offset = torch.arange(1, 2 * half + gap) - start  # of target j (= seq[j + 1]) in the second part
    counted = (offset >= 0) & (offset % segment != 0)
    sources = torch.full((batch, 2 * half + gap - 1), -1)
    sources[:, counted] = src[:, offset[counted]]
    return seq[:, :-1], seq[:, 1:], counted.float().expand(batch, -1).clone(), sources


def model_config(name: str, args) -> nsa.ModelConfig:
    return nsa.ModelConfig(vocab_size=args.alphabet, n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                           n_kv_head=args.kv_heads, nsa=nsa_config(args), backend="reference", **MODELS[name])


def nsa_config(args) -> nsa.NSAConfig:
    return nsa.NSAConfig(cmp_block=args.block // 2, cmp_stride=args.block // 4, slc_block=args.block,
                         num_selected=args.selected, window=args.window)


@torch.no_grad()
def copy_loss(model, batches) -> float:
    model.eval()
    loss = sum(model(i, t, loss_weights=w)[1].item() for i, t, w, _ in batches) / len(batches)
    model.train()
    return loss


def train(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = nsa.LanguageModel(model_config(name, args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val = [copy_batch(args.batch, args.half, args.alphabet, val_gen, args.segment, args.gap) for _ in range(4)]
    curve, start = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            curve.append((step, copy_loss(model, val)))
            print(f"{name} step {step}: second-copy loss {curve[-1][1]:.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        if step == args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, targets, weights, _ = copy_batch(args.batch, args.half, args.alphabet, gen, args.segment, args.gap)
        _, loss = model(inputs, targets, loss_weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return dict(curve=curve, final_loss=curve[-1][1], seconds=time.perf_counter() - start,
                layers=copy_source_hits(model, val[0][0], sources=val[0][3]) if name != "full" else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="nsa,swa,full")
    p.add_argument("--half", type=int, default=128, help="H: symbols in each copy (T = 2H)")
    p.add_argument("--alphabet", type=int, default=16)
    p.add_argument("--segment", type=int, default=None, help="shuffle the second copy in segments of this many "
                   "symbols (default: the plain copy)")
    p.add_argument("--gap", type=int, default=0, help="random symbols between the two parts")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--block", type=int, default=16, help="selection block l' (compressed l = l'/2, stride d = l'/4)")
    p.add_argument("--selected", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON of the results")
    args = p.parse_args()
    if args.segment is None and args.gap == 0 and args.window >= args.half - 1:
        raise SystemExit(f"--window ({args.window}) must be below --half - 1 ({args.half - 1}): else the window "
                         "alone reaches the first copy")
    if args.segment is not None and args.gap < args.window:
        raise SystemExit(f"--gap ({args.gap}) must be at least --window ({args.window}) with --segment: else the "
                         "window reaches the sources of the first segments")
    results = {name: train(name, args) for name in args.models.split(",")}
    chance = math.log(args.alphabet)
    print(f"\nSecond-copy loss, nats/token (chance: log {args.alphabet} = {chance:.3f}); T = {2 * args.half + args.gap}, "
          f"segment {args.segment or args.half}, window "
          f"{args.window}, NSAConfig {nsa_config(args)}\n")
    print("| model | final loss | seconds | NSA layer: hit rate / chance, gates cmp/slc/swa |")
    print("|---|---|---|---|")
    for name, r in results.items():
        layers = "; ".join(f"{s['hit_rate']:.2f} / {s['chance']:.2f}, " + "/".join(f"{v:.2f}" for v in s["gate_mean"].values())
                           for s in r["layers"]) or "-"
        print(f"| {name} | {r['final_loss']:.3f} | {r['seconds']:.0f} | {layers} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), chance=chance, results=results), f, indent=1)


if __name__ == "__main__":
    main()
