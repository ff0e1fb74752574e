"""Where a decoding step's time goes, CUDA only: per-kernel device time of nsa_decode_attention, and the top
host-side operations of one generate() step of the small model.

Part 1: shape P (Hq 64, Hkv 4, D 128, bfloat16), every row at L tokens; each of the step's kernels timed by
the CUDA profiler (mean over --iters eager calls), for several split targets (programs per key-splitting
launch = factor x SMs, passed as KernelOptions(decode_programs=...); the library's choice is 1); with --sweep,
the named kernels under the library's choice and each (tile, num_warps, num_stages) of SWEEP, one
KernelOptions(decode_cmp / decode_sparse / decode_score = Launch(...)) per variant.
Part 2 (--layer-steps): one attention layer's one-token decoding step (layer.step) of each model of --models
(common.MODELS), every row holding each of --L tokens, batch --B: CUDA kernel launches and device time per step
(profiler, mean of --iters eager steps), split into the attention kernels (NSA: nsa_decode_attention's four; full
attention: SDPA's) and the glue (everything else in the step: projections, rotary embeddings, cache writes, phi),
for NSA with its glue fused (ops/triton/decode_glue.py) and in torch, and for full attention; then each
configuration's kernels by device time (--rows of them).
Part 3: torch.profiler over --steps one-token steps of the small model after a --prompt token prompt, NSA and
full attention, eager and replayed from a CUDA graph (DecodeGraph, generate's default): total CPU and CUDA time
per step and the operations with the most CPU time (eager) or device time (graph).
Prints markdown tables (and torch.profiler's own tables for part 2).

    python benchmarks/profile_decode.py --B 1 32 --L 65536 --sweep cmp sparse score
    python benchmarks/profile_decode.py --B 1 32 --L 8192 65536 --factors --prompt 0 --layer-steps
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


# Attention kernels of a layer step (substrings of their names); every other kernel of the step is glue.
ATTENTION_KERNELS = {"nsa": tuple(KERNELS.values()), "full": ("fmha", "flash", "attention", "cudnn")}


def filled_layer_cache(layer, B, L, room):
    """A cache of `layer` for B rows holding L tokens of random content each, with room for `room` more."""
    cache = layer.new_cache(B, L + room)
    for t in vars(cache).values():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t is not getattr(cache, "rope_inv_freq", None):
            t.normal_()
    cache.set_seqlens([L] * B)
    cache.advance_host(0)  # an NSA cache's ring bookkeeping follows the new lengths
    return cache


def profile_layer_steps(args):
    """Launches and device time of one layer's decoding step, attention kernels against glue (module docstring)."""
    rows, details = [], []
    for model_name in args.models:
        for attention, glue in (("nsa", "fused"), ("nsa", "torch"), ("full", None)):
            model = common.make_model(model_name, attention, 1, fuse_decode_glue=glue == "fused")
            layer = model.blocks[0].attn
            for B in args.B:
                for L in args.L:
                    cache = filled_layer_cache(layer, B, L, args.iters + 1)
                    x = torch.randn(B, 1, model.cfg.n_embd, device="cuda", dtype=common.DTYPE)
                    with torch.no_grad():
                        prof, err = common.guarded(common.kernel_profile, lambda: layer.step(x, cache), args.iters)
                    label = [model_name, attention if glue is None else f"nsa ({glue} glue)", B, L]
                    if prof is None:
                        rows.append(label + [common.fmt(None, error=err)] * 6)
                        continue
                    is_attention = {k: any(n in k for n in ATTENTION_KERNELS[attention]) for k in prof}
                    split = [[sum(v[i] for k, v in prof.items() if is_attention[k] == part) for i in (0, 1)]
                             for part in (True, False)]
                    (att_n, att_us), (glue_n, glue_us) = split
                    rows.append(label + [f"{att_n + glue_n:.0f}", f"{att_us + glue_us:.1f}", f"{att_n:.0f}",
                                         f"{att_us:.1f}", f"{glue_n:.0f}", f"{glue_us:.1f}"])
                    top = sorted(prof.items(), key=lambda kv: -kv[1][1])[:args.rows]
                    part = {k: "attention" if is_attention[k] else "glue" for k in prof}
                    details.append((label, [[k[:70], f"{n:.0f}", f"{us:.1f}", part[k]] for k, (n, us) in top]))
                    del cache
            del model, layer
            torch.cuda.empty_cache()
    print("\nOne layer's decoding step: launches and device time per step (CUDA profiler, eager, mean of --iters):\n")
    print(common.table(["model", "attention", "B", "L", "launches", "device us", "attention launches",
                        "attention us", "glue launches", "glue us"], rows))
    for label, top in details:
        print(f"\n{' '.join(str(x) for x in label)}: kernels by device time\n")
        print(common.table(["kernel", "launches", "us", "part"], top))


def profile_generate(args):
    """torch.profiler over --steps decoding steps of the small model, eager and replayed from a CUDA graph."""
    for attention in ("nsa", "full"):
        _, err = common.guarded(profile_model, attention, args)
        if err:
            print(f"\n{attention}: n/a ({err})")


def profile_model(attention, args):
    """Profiles --steps decoding steps of the small model (4 layers) with `attention`, eager then graphed."""
    model = common.make_model("small", attention, 4)
    prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt), device="cuda")
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
    parser.add_argument("--factors", type=int, nargs="*", default=[1, 2],
                        help="split targets: programs per key-splitting launch = factor x SMs (none skips part 1)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--prompt", type=int, default=32768, help="generate profile: prompt tokens (0 skips it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sweep", nargs="*", default=[], choices=sorted(SWEEP),
                        help="also time the SWEEP launch variants of these kernels")
    parser.add_argument("--layer-steps", action="store_true",
                        help="part 2: one layer's decoding step as attention kernels and glue")
    parser.add_argument("--models", nargs="+", default=sorted(common.MODELS), choices=sorted(common.MODELS),
                        help="part 2: models (common.MODELS)")
    args = parser.parse_args()
    common.require_cuda("profile_decode.py")
    common.print_header("decoding step profile")
    if args.factors:
        profile_kernels(args)
    if args.sweep:
        sweep_launch(args)
    if args.layer_steps:
        profile_layer_steps(args)
    if args.prompt:
        profile_generate(args)


if __name__ == "__main__":
    main()
