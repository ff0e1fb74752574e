"""Where a decoding step's time goes, CUDA only: per-kernel device time of nsa_decode_attention, and the top
host-side operations of one generate() step of the small model.

Part 1: shape P (Hq 64, Hkv 4, D 128, bfloat16), every row at L tokens; each of the step's kernels timed by
the CUDA profiler (mean over --iters eager calls), for several split targets (programs per key-splitting
launch = factor x SMs; the library's choice is 1); with --sweep, the cmp and sparse kernels under each
(tile, num_warps, num_stages) of SWEEP.
Part 2: torch.profiler over --steps one-token steps of the small model after a --prompt token prompt, NSA and
full attention, eager and replayed from a CUDA graph (DecodeGraph, generate's default): total CPU and CUDA time
per step and the operations with the most CPU time (eager) or device time (graph).

    PYTHONPATH=src python benchmarks/profile_decode.py
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import nsa
from nsa.graph import DecodeGraph
from nsa.ops.triton import decode

from bench_decode import make_step, nsa_step


# The decoding step's kernels: column name -> kernel name (the block-score kernel also does each chunk's top-n, the
# sparse kernel the final top-n of their winners).
KERNELS = {"cmp": "_cmp_kernel", "score": "_block_score_kernel",
           "sparse": "_sparse_kernel", "combine": "_combine_kernel"}


def kernel_times(fn, iters):
    """{kernel name: mean device microseconds per call} of fn's CUDA kernels."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name] += e.device_time / iters
    return dict(times)


def profile_kernels(args):
    config = nsa.NSAConfig()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    default = decode.target_programs
    print("\n| B | L | split factor | " + " | ".join(KERNELS) + " | sum |")
    print("|---|---|---|" + "---|" * (len(KERNELS) + 1))
    for B in args.B:
        for L in args.L:
            step = nsa_step(make_step(B, L, config), config)
            for factor in args.factors:
                decode.target_programs = lambda device, f=factor: f * sms
                with torch.no_grad():
                    t = kernel_times(step, args.iters)
                parts = [sum(v for k, v in t.items() if name in k) for name in KERNELS.values()]
                print(f"| {B} | {L} | {factor} | " + " | ".join(f"{p:.1f}" for p in parts) + f" | {sum(parts):.1f} |")
            del step
            torch.cuda.empty_cache()
    decode.target_programs = default


# (block, num_warps, num_stages) variants of decode.LAUNCH tried by --sweep (None: not an option of that kernel).
SWEEP = {
    "cmp": [(64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3)],
    "sparse": [(32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 4, 2), (64, 8, 1), (128, 4, 1), (128, 8, 1), (128, 8, 2)],
    "score": [(None, 1, None), (None, 2, None), (None, 4, None), (None, 8, None)],
}


def sweep_launch(args):
    """Per-kernel times of the kernels named by --sweep (and the step's total) under each SWEEP variant."""
    config = nsa.NSAConfig()
    print("\n| B | L | kernel | block | num_warps | num_stages | kernel us | step kernels us |")
    print("|---|---|---|---|---|---|---|---|")
    default = {k: dict(v) for k, v in decode.LAUNCH.items()}
    for B in args.B:
        for L in args.L:
            step = nsa_step(make_step(B, L, config), config)
            for kernel in args.sweep:
                name = KERNELS[kernel]
                for block, warps, stages in SWEEP[kernel]:
                    options = dict(block=block, num_warps=warps, num_stages=stages)
                    decode.LAUNCH[kernel] = {k: v for k, v in options.items() if v is not None}
                    with torch.no_grad():
                        t = kernel_times(step, args.iters)
                    us = sum(v for k, v in t.items() if name in k)
                    print(f"| {B} | {L} | {kernel} | {block} | {warps} | {stages} | {us:.1f} | {sum(t.values()):.1f} |")
                decode.LAUNCH[kernel] = dict(default[kernel])


def profile_generate(args):
    """torch.profiler over --steps decoding steps of the small model, eager and replayed from a CUDA graph."""
    for attention in ("nsa", "full"):
        cfg = nsa.ModelConfig(n_layer=4, n_embd=512, n_head=8, n_kv_head=2, attention=attention)
        model = nsa.LanguageModel(cfg).to("cuda", torch.bfloat16).eval()
        prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), device="cuda")
        cache = model.new_cache(1, args.prompt + 2 * args.steps + 8, device="cuda")
        with torch.no_grad():
            model(prompt, cache=cache)
            token = prompt[:, -1:]
            model(token, cache=cache)  # warm up the step's kernels
            graph = DecodeGraph(model, cache)
            for mode, step in (("eager", lambda: model(token, cache=cache)), ("graph", lambda: graph(token[:, 0]))):
                step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(args.steps):
                        step()
                    torch.cuda.synchronize()
                events = prof.key_averages()
                cpu = sum(e.self_cpu_time_total for e in events) / args.steps
                cuda = sum(e.self_device_time_total for e in events) / args.steps
                print(f"\n{attention}, {mode} steps: per step {cpu / 1e3:.2f} ms CPU (self, all ops), "
                      f"{cuda / 1e3:.2f} ms CUDA")
                sort = "self_cpu_time_total" if mode == "eager" else "self_device_time_total"
                print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[65536])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32768, help="generate profile: prompt tokens (0 skips it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sweep", nargs="*", default=[], choices=sorted(SWEEP),
                        help="also time the SWEEP variants of decode.LAUNCH of these kernels")
    args = parser.parse_args()
    profile_kernels(args)
    if args.sweep:
        sweep_launch(args)
    if args.prompt:
        profile_generate(args)


if __name__ == "__main__":
    main()
