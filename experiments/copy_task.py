"""Retrieval beyond the window on a synthetic copy task: can NSA's compressed and selected branches fetch tokens
that the sliding window cannot see? Small enough for a CPU (minutes), so it runs where the GPU time is short.

Each sequence is H random symbols (an alphabet of A) written twice: x[0:H] then the same x[0:H] again (T = 2H). The
loss counts only the second copy's predictions (targets H+1 .. 2H-1), which a model can get right only by looking
H - 1 tokens back: with the window w < H - 1 the window branch alone cannot, so window-only stays at chance
(log A nats) while full attention learns to copy (an induction mechanism: previous-token head, then match). NSA has
to reach the first copy through its selected blocks (ranked by the compressed scores) or its compressed tokens.
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


def copy_batch(batch: int, half: int, alphabet: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(inputs long [B, T - 1], targets long [B, T - 1], loss weights [B, T - 1]) of B sequences x x (T = 2 * half):
    weight 1 on the targets of the second copy after its first symbol (positions half + 1 .. T - 1)."""
    x = torch.randint(0, alphabet, (batch, half), generator=gen)
    seq = torch.cat((x, x), dim=1)
    weights = torch.zeros(batch, 2 * half - 1)
    weights[:, half:] = 1.0  # target index j predicts seq[j + 1]: j >= half predicts the second copy from its 2nd symbol
    return seq[:, :-1], seq[:, 1:], weights


def model_config(name: str, args) -> nsa.ModelConfig:
    return nsa.ModelConfig(vocab_size=args.alphabet, n_layer=args.layers, n_embd=args.width, n_head=args.heads,
                           n_kv_head=args.kv_heads, nsa=nsa_config(args), backend="reference", **MODELS[name])


def nsa_config(args) -> nsa.NSAConfig:
    return nsa.NSAConfig(cmp_block=args.block // 2, cmp_stride=args.block // 4, slc_block=args.block,
                         num_selected=args.selected, window=args.window)


@torch.no_grad()
def copy_loss(model, batches) -> float:
    model.eval()
    loss = sum(model(i, t, loss_weights=w)[1].item() for i, t, w in batches) / len(batches)
    model.train()
    return loss


def train(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model = nsa.LanguageModel(model_config(name, args))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    val_gen = torch.Generator().manual_seed(args.seed + 1)
    val = [copy_batch(args.batch, args.half, args.alphabet, val_gen) for _ in range(4)]
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
        inputs, targets, weights = copy_batch(args.batch, args.half, args.alphabet, gen)
        _, loss = model(inputs, targets, loss_weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return dict(curve=curve, final_loss=curve[-1][1], seconds=time.perf_counter() - start,
                layers=copy_source_hits(model, val[0][0], args.half) if name != "full" else [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="nsa,swa,full")
    p.add_argument("--half", type=int, default=128, help="H: symbols in each copy (T = 2H)")
    p.add_argument("--alphabet", type=int, default=16)
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
    if args.window >= args.half - 1:
        raise SystemExit(f"--window ({args.window}) must be below --half - 1 ({args.half - 1}): else the window "
                         "alone reaches the first copy")
    results = {name: train(name, args) for name in args.models.split(",")}
    chance = math.log(args.alphabet)
    print(f"\nSecond-copy loss, nats/token (chance: log {args.alphabet} = {chance:.3f}); T = {2 * args.half}, window "
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
