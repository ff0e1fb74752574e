"""Where a decoding step's time goes, CUDA only: per-kernel device time of nsa_decode_attention, and the top
host-side operations of one generate() step of the small model.

Part 1: shape P (Hq 64, Hkv 4, D 128, bfloat16), every row at L tokens; each of the step's kernels timed by
the CUDA profiler (mean over --iters eager calls), for several split targets (programs per key-splitting
launch = factor x SMs, passed as KernelOptions(decode_programs=...); the library's choice is 1); with --sweep,
the named kernels under the library's choice and each (tile, num_warps, num_stages) of SWEEP, one
KernelOptions(decode_cmp / decode_sparse / decode_score = Launch(...)) per variant.
Part 2: torch.profiler over --steps one-token steps of the small model after a --prompt token prompt, NSA and
full attention, eager and replayed from a CUDA graph (DecodeGraph, generate's default): total CPU and CUDA time
per step and the operations with the most CPU time (eager) or device time (graph).
Prints markdown tables (and torch.profiler's own tables for part 2).

    python benchmarks/profile_decode.py --B 1 32 --L 65536 --sweep cmp sparse score
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

import common
import nsa
from common import decode_inputs, decode_step, kernel_sum, kernel_times
from nsa import KernelOptions, Launch
from nsa.graph import DecodeGraph

# The decoding step's kernels: column name -> kernel name (the block-score kernel also does each chunk's top-n, the
# sparse kernel the final top-n of their winners).
KERNELS = {"cmp": "_cmp_kernel", "score": "_block_score_kernel",
           "sparse": "_sparse_kernel", "combine": "_combine_kernel"}
# The KernelOptions field each swept kernel's Launch goes to.
OPTION = {"cmp": "decode_cmp", "sparse": "decode_sparse", "score": "decode_score"}


def profile_kernels(args):
    """Per-kernel times at each split target: KernelOptions(decode_programs = factor x SMs)."""
    config = nsa.NSAConfig()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for B in args.B:
        for L in args.L:
            x = decode_inputs(B, L, config)
            for factor in args.factors:
                step = decode_step(x, config, KernelOptions(decode_programs=factor * sms))
                with torch.no_grad():
                    t, err = common.guarded(kernel_times, step, args.iters)
                parts = [None if t is None else kernel_sum(t, name) for name in KERNELS.values()]
                total = None if t is None else sum(parts)
                rows.append([B, L, factor, *(common.fmt(p, ".1f", err) for p in parts), common.fmt(total, ".1f", err)])
            del x
            torch.cuda.empty_cache()
    print("\nPer-kernel device time, us (CUDA profiler, mean of --iters eager calls):\n")
    print(common.table(["B", "L", "split factor", *KERNELS, "sum"], rows))


# (block, num_warps, num_stages) variants of the kernels' Launch tried by --sweep (None: the library's choice, or
# not an option of that kernel).
SWEEP = {
    "cmp": [(64, 4, 2), (64, 4, 3), (64, 8, 3), (128, 4, 2), (128, 8, 2), (128, 4, 3), (128, 8, 3)],
    "sparse": [(32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 4, 2), (64, 8, 1), (128, 4, 1), (128, 8, 1), (128, 8, 2)],
    "score": [(None, 1, None), (None, 2, None), (None, 4, None), (None, 8, None)],
}


def sweep_launch(args):
    """Per-kernel times of the kernels named by --sweep (and the step's total) under the library's choice and each
    SWEEP variant, one KernelOptions per variant."""
    config = nsa.NSAConfig()
    rows = []
    for B in args.B:
        for L in args.L:
            x = decode_inputs(B, L, config)
            for kernel in args.sweep:
                for variant in [None, *SWEEP[kernel]]:
                    if variant is None:
                        options, label = KernelOptions(), ["library", "", ""]
                    else:
                        block, warps, stages = variant
                        launch = Launch(block=block, num_warps=warps, num_stages=stages)
                        options, label = KernelOptions(**{OPTION[kernel]: launch}), list(variant)
                    step = decode_step(x, config, options)
                    with torch.no_grad():
                        t, err = common.guarded(kernel_times, step, args.iters)
                    us = None if t is None else kernel_sum(t, KERNELS[kernel])
                    total = None if t is None else sum(t.values())
                    rows.append([B, L, kernel, *label, common.fmt(us, ".1f", err), common.fmt(total, ".1f", err)])
            del x
            torch.cuda.empty_cache()
    print("\nLaunch sweep (CUDA profiler, us):\n")
    print(common.table(["B", "L", "kernel", "block", "num_warps", "num_stages", "kernel us", "step kernels us"], rows))


def profile_generate(args):
    """torch.profiler over --steps decoding steps of the small model, eager and replayed from a CUDA graph."""
    for attention in ("nsa", "full"):
        _, err = common.guarded(profile_model, attention, args)
        if err:
            print(f"\n{attention}: n/a ({err})")


def profile_model(attention, args):
    """Profiles --steps decoding steps of the small model with `attention`, eager then graphed."""
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
    parser = common.parser(__doc__, out=None, timing=False)
    parser.add_argument("--L", type=int, nargs="+", default=[65536])
    parser.add_argument("--B", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2],
                        help="split targets: programs per key-splitting launch = factor x SMs")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32768, help="generate profile: prompt tokens (0 skips it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sweep", nargs="*", default=[], choices=sorted(SWEEP),
                        help="also time the SWEEP launch variants of these kernels")
    args = parser.parse_args()
    common.require_cuda("profile_decode.py")
    common.print_header("decoding step profile")
    profile_kernels(args)
    if args.sweep:
        sweep_launch(args)
    if args.prompt:
        profile_generate(args)


if __name__ == "__main__":
    main()
