"""The two-stage conversion recipe (README, "Converting a dense model") on a tiny Llama, end to end on the CPU.

1. dense original: a randomly initialized transformers Llama built from a config (nothing downloaded), byte-level
   (vocab 256), trained for --dense-steps on the Python standard library's source (nsa.data.load_corpus);
2. nsa.convert(model, NSAConfig(...)) with a window shorter than the sequence: NSA attention keeps q/k/v/o,
   phi starts as mean pooling, the compressed and selected branches start nearly closed;
3. stage 1: only what conversion created (phi and the gates, nsa.hf.new_parameters) for --stage1-steps;
4. stage 2: every weight for --stage2-steps;
against the dense model continued for the same stage 1 + stage 2 steps on the same batches (at stage 2's learning
rate). Prints the validation loss (nats per byte = per token) after each stage.

    PYTHONPATH=src python examples/convert_demo.py            # a few minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import nsa
from nsa.data import get_batch, load_corpus
from nsa.hf import new_parameters


def tiny_llama(seq_len: int) -> LlamaForCausalLM:
    """A 2-layer byte-level Llama (hidden 128, 4 query heads over 2 key/value heads of 32)."""
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=seq_len,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def batches(data: torch.Tensor, steps: int, batch_size: int, seq_len: int, seed: int) -> list[torch.Tensor]:
    """steps random windows long [batch_size, seq_len] of data, drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    return [get_batch(data, batch_size, seq_len, generator)[0] for _ in range(steps)]


def train(model, params, windows: list[torch.Tensor], lr: float, warmup: int = 10) -> None:
    """AdamW on params over the windows (one step each), the learning rate warmed up linearly then constant."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
    model.train()
    for ids in windows:
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()


@torch.no_grad()
def val_loss(model, windows: list[torch.Tensor]) -> float:
    """Mean next-byte cross-entropy (nats per byte) over the validation windows."""
    model.eval()
    return sum(model(ids, labels=ids, use_cache=False).loss.item() for ids in windows) / len(windows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense-steps", type=int, default=300, help="training steps of the dense original")
    p.add_argument("--stage1-steps", type=int, default=30, help="stage 1: phi and gates only")
    p.add_argument("--stage2-steps", type=int, default=70, help="stage 2: every weight")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--val-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3, help="the dense original's and stage 1's learning rate")
    p.add_argument("--stage2-lr", type=float, default=1e-3, help="stage 2's (and the continued dense model's)")
    p.add_argument("--window", type=int, default=32, help="NSA's sliding window (below --seq-len: sparse)")
    p.add_argument("--max-bytes", type=int, default=2_000_000, help="bytes of the stdlib source to load")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("dense_steps", "stage1_steps", "stage2_steps", "seq_len", "batch_size", "val_batches", "window"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")

    corpus = load_corpus(None, max_bytes=args.max_bytes)
    T, B = args.seq_len, args.batch_size
    val = batches(corpus.val, args.val_batches, B, T, seed=1)
    more = args.stage1_steps + args.stage2_steps
    pretrain, after = batches(corpus.train, args.dense_steps, B, T, args.seed + 2), \
        batches(corpus.train, more, B, T, args.seed + 3)
    print(f"data: {corpus.source}, {len(corpus.train):,} train / {len(corpus.val):,} validation bytes; "
          f"batches of {B} x {T} bytes")

    torch.manual_seed(args.seed)
    dense = tiny_llama(T)
    start = time.perf_counter()
    train(dense, dense.parameters(), pretrain, args.lr)
    losses = {"dense original": val_loss(dense, val)}
    print(f"dense original after {args.dense_steps} steps: val {losses['dense original']:.4f} nats/byte "
          f"({time.perf_counter() - start:.0f} s)")

    # each query reads at most 2 selected blocks of 16 and the window: 64 of 128 bytes at the defaults
    converted = nsa.convert(copy.deepcopy(dense), nsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16,
                                                                num_selected=2, window=args.window))
    losses["converted, untrained"] = val_loss(converted, val)
    start = time.perf_counter()
    converted.requires_grad_(False)  # stage 1: phi and the gates only
    for param in new_parameters(converted):
        param.requires_grad_(True)
    train(converted, new_parameters(converted), after[:args.stage1_steps], args.lr)
    losses["NSA after stage 1"] = val_loss(converted, val)
    converted.requires_grad_(True)  # stage 2: everything
    train(converted, converted.parameters(), after[args.stage1_steps:], args.stage2_lr)
    losses["NSA after stage 2"] = val_loss(converted, val)
    nsa_s = time.perf_counter() - start

    start = time.perf_counter()
    train(dense, dense.parameters(), after, args.stage2_lr)
    losses["dense continued"] = val_loss(dense, val)
    dense_s = time.perf_counter() - start

    print(f"\nvalidation loss, nats per byte ({args.val_batches} x {B} x {T} bytes); NSA window {args.window}:")
    for name, loss in losses.items():
        print(f"  {name:24s} {loss:.4f}")
    print(f"stage 1 + 2 ({more} steps) took {nsa_s:.0f} s; the dense model's {more} steps {dense_s:.0f} s")
    return losses


if __name__ == "__main__":
    main()
