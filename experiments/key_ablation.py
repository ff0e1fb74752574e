"""Which branch of which layer carries the passkey? Causal ablations of a trained `nsa train` checkpoint.

Passkey prompts (nsa.eval.make_prompt, filler from the run's validation text) are followed by their answer
(ANSWER, teacher-forced), and the score is the share of the key's 5 digits that the model predicts right, each from
the position before it (a guess gets 0.10). The same prompts run again with one thing removed in one NSA layer:
  cmp-key     the values of the compressed tokens that cover a key digit set to 0 (their keys, so the attention
              weights and the selection, unchanged);
  cmp-rest    the values of every other compressed token set to 0 (only the key's tokens left);
  slc-key     the selection branch's raw values in the blocks that hold a key digit set to 0;
  gate-cmp, gate-slc, gate-swa   that branch's gate set to 0 (the branch removed).
A drop to ~0.10 says the model's answer goes through what was removed; no drop, that it does not. Attention
weights say where a head looks; these say what the answer is made of (a head may look everywhere evenly and still
take the key from the values, if the key's values stand out).

    python experiments/key_ablation.py RUN [--lengths 256,512] [--depths 0.1,0.3,0.5,0.7,0.9] [--trials 8] [--out F]
"""
from __future__ import annotations

import argparse
import json
import random

import torch

from nsa.checkpoint import load_model
from nsa.cli import resolve_device, run_corpus
from nsa.eval import ANSWER, ANSWER_PREFIX, KEY_DIGITS, cmp_tokens_holding, key_positions, make_prompt
from nsa.layer import BRANCHES, NativeSparseAttention
from nsa.model import autocast

ABLATIONS = ("cmp-key", "cmp-rest", "slc-key") + tuple(f"gate-{b}" for b in BRANCHES)


def teacher_forced_prompts(filler: torch.Tensor, length: int, depths: list[float], trials: int, rng: random.Random
                           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(idx long [B, length + len(ANSWER)]: prompts then their answers, key_pos long [B, KEY_DIGITS], the position
    of the key's first digit in the answer); B = len(depths) * trials."""
    rows, keys = [], []
    for depth in depths:
        for _ in range(trials):
            key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
            prompt = make_prompt(filler, length, depth, key, rng.randrange(len(filler)))
            rows.append(torch.cat([prompt.tokens, torch.tensor(list(ANSWER.format(key=key).encode()))]))
            keys.append(key_positions(prompt))
    return torch.stack(rows), torch.stack(keys), length + len(ANSWER_PREFIX)


def ablation(name: str, key_pos: torch.Tensor):
    """name (one of ABLATIONS) -> a function (layer, NSAInputs) -> NSAInputs with that part removed."""
    def edit(layer: NativeSparseAttention, inputs):
        c = layer.config
        if name in ("cmp-key", "cmp-rest"):
            keep = ~cmp_tokens_holding(key_pos, inputs.v_cmp.shape[1], c)  # [B, Tc]
            keep = keep if name == "cmp-key" else ~keep
            return inputs._replace(v_cmp=inputs.v_cmp * keep[:, :, None, None].to(inputs.v_cmp))
        if name == "slc-key":
            T = inputs.v_slc.shape[1]
            blocks = torch.arange(T) // c.slc_block
            in_key_block = (blocks[None, :, None] == (key_pos // c.slc_block)[:, None, :]).any(-1)  # [B, T]
            return inputs._replace(v_slc=inputs.v_slc * (~in_key_block)[:, :, None, None].to(inputs.v_slc))
        gates = inputs.gates.clone()
        gates[..., BRANCHES.index(name.removeprefix("gate-"))] = 0
        return inputs._replace(gates=gates)
    return edit


@torch.no_grad()
def digits_right(model, idx: torch.Tensor, first: int, edit=None, layer: NativeSparseAttention | None = None
                 ) -> float:
    """The share of the key's digits (idx[:, first:first + KEY_DIGITS]) predicted right, with edit applied to
    layer's inputs (none: the model as trained)."""
    if layer is not None:
        own = layer.nsa_inputs
        layer.nsa_inputs = lambda x, cu_seqlens=None: edit(layer, own(x, cu_seqlens))
    try:
        with autocast(idx.device):
            logits, _ = model(idx)
    finally:
        if layer is not None:
            del layer.nsa_inputs  # back to the class's method
    pred = logits[:, first - 1:first - 1 + KEY_DIGITS].argmax(-1)
    return (pred == idx[:, first:first + KEY_DIGITS]).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="an nsa train run folder or checkpoint")
    parser.add_argument("--lengths", default="256,512")
    parser.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    parser.add_argument("--trials", type=int, default=8, help="prompts per depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    model, config = load_model(args.run, resolve_device(args.device))
    layers = [block.attn for block in model.blocks if isinstance(block.attn, NativeSparseAttention)]
    if not layers:
        raise SystemExit(f"{args.run} has no NSA layer to ablate")
    device = next(model.parameters()).device
    filler = run_corpus(config).val
    lengths = [int(v) for v in args.lengths.split(",")]
    depths = [float(v) for v in args.depths.split(",")]
    rng = random.Random(args.seed)
    results = {"run": str(args.run), "lengths": lengths, "depths": depths, "trials": args.trials, "layers": []}
    batches = []
    for length in lengths:
        idx, key_pos, first = teacher_forced_prompts(filler, length, depths, args.trials, rng)
        batches.append((idx.to(device), key_pos, first))
    results["none"] = [digits_right(model, idx, first) for idx, _, first in batches]
    for layer in layers:
        results["layers"].append({name: [digits_right(model, idx, first, ablation(name, key_pos), layer)
                                         for idx, key_pos, first in batches] for name in ABLATIONS})
    print(f"{args.run}: key digits predicted right (teacher-forced; a guess 0.10) at lengths {lengths}, "
          f"{len(depths)} depths x {args.trials} prompts each")
    print("| layer | removed | " + " | ".join(str(n) for n in lengths) + " |")
    print("|---|---|" + "---|" * len(lengths))
    print("| - | nothing | " + " | ".join(f"{v:.3f}" for v in results["none"]) + " |")
    for i, per_layer in enumerate(results["layers"]):
        for name, values in per_layer.items():
            print(f"| {i} | {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
