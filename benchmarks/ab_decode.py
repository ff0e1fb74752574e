"""Decoding-step variants side by side in one run, CUDA only (shape P: Hq 64, Hkv 4, D 128, bfloat16).

Variants: programmatic dependent launch on / off (decode.USE_PDL) x cache storage token-major [B, T, Hkv, D]
or head-major [B, Hkv, T, D] (viewed as [B, T, Hkv, D]; the same values). For each, at every (B, L): outputs
bitwise equal to the first variant's, the step replayed as a CUDA graph (bench_decode.bench: do_bench median,
L2 flushed), the per-layer time inside one graph of --graph-layers layers (own caches, batch 1 only), and each
kernel's CUDA-profiler time (eager calls; with PDL a kernel's time includes its wait for the previous one, so
only the step times compare). Then the registers, spills and shared memory of each compiled kernel.

    PYTHONPATH=src:benchmarks python benchmarks/ab_decode.py --B 1 32 --L 65536
"""
from __future__ import annotations

import argparse
import itertools

import torch

from nsa import NSAConfig
from nsa.ops.triton import decode

from bench_decode import bench, make_step, nsa_step
from profile_decode import KERNELS, kernel_times


def run(B, L, config, args):
    rows, baseline = [], None
    for pdl, head_major in itertools.product((False, True), (False, True)):
        decode.USE_PDL = pdl
        x = make_step(B, L, config, head_major=head_major)
        step = nsa_step(x, config)
        with torch.no_grad():
            out = step().clone()
            baseline = out if baseline is None else baseline
            ms = bench(step, args.warmup, args.rep)["ms"]
            kernels = kernel_times(step, args.iters)
            layer_us = None
            if B == 1 and args.graph_layers:
                steps = [nsa_step(make_step(B, L, config, seed=i, head_major=head_major), config)
                         for i in range(args.graph_layers)]
                layer_us = bench(lambda: [s() for s in steps], args.warmup, args.rep)["ms"] * 1e3 / args.graph_layers
                del steps
        parts = [sum(v for k, v in kernels.items() if name in k) for name in KERNELS.values()]
        rows.append((pdl, head_major, torch.equal(out, baseline), ms, layer_us, parts))
        del x, step
        torch.cuda.empty_cache()
    decode.USE_PDL = True
    for pdl, head_major, same, ms, layer_us, parts in rows:
        layer = "-" if layer_us is None else f"{layer_us:.1f}"
        print(f"| {B} | {L} | {pdl} | {'head' if head_major else 'token'} | {same} | {ms * 1e3:.1f} | {layer} | "
              + " | ".join(f"{p:.1f}" for p in parts) + " |", flush=True)


def print_resources():
    """Registers a thread, spilled registers and shared memory of every compiled decoding kernel (occupancy)."""
    print("\n| kernel | num_warps | registers | spills | shared bytes |\n|---|---|---|---|---|")
    for name in KERNELS.values():
        for cache in getattr(decode, name).device_caches.values():
            for kernel in cache[0].values():
                print(f"| {name} | {kernel.metadata.num_warps} | {kernel.n_regs} | {kernel.n_spills} | "
                      f"{kernel.metadata.shared} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[65536])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--rep", type=int, default=100)
    parser.add_argument("--iters", type=int, default=20, help="profiled eager calls per variant")
    parser.add_argument("--graph-layers", type=int, default=8)
    args = parser.parse_args()
    config = NSAConfig()
    print("| B | L | PDL | cache | output equal | step us (graph) | per layer in graph us | "
          + " | ".join(KERNELS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(KERNELS))
    for B in args.B:
        for L in args.L:
            run(B, L, config, args)
    print_resources()


if __name__ == "__main__":
    main()
