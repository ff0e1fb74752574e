"""Launch-parameter sweep of the training kernels, CUDA only: per-kernel device time (CUDA profiler) of the
banded flash kernels (compressed and window branches) and of the selected-attention kernels under variants of
their tiles, warps and pipeline stages. Shape P (Hq 64, Hkv 4, D 128) by default, bfloat16, default NSAConfig.

Each flash variant sets the forward, dk/dv and dq tiles at once (they are separate kernels, timed apart), so
one compile per variant serves three comparisons. Prints one markdown table per part; the first row of each
is the library's choice.

    PYTHONPATH=src:benchmarks python benchmarks/tune_kernels.py --T 65536
"""
from __future__ import annotations

import argparse

import torch

import nsa
from nsa.ops.triton import flash, selected
from nsa.ops.triton.flash import banded_attention_bwd, banded_attention_fwd, branch_band
from nsa.ops.triton.selected import selected_attention_bwd, selected_attention_fwd

from profile_decode import kernel_times

SHAPES = {"P": (64, 4), "S": (32, 8)}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward, dk/dv and dq kernels, one variant per row.
FLASH = [
    ((64, 64, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2)),
    ((64, 64, 4, 2), (64, 128, 4, 2), (64, 32, 4, 3)),
    ((64, 128, 4, 2), (32, 128, 4, 2), (32, 64, 4, 2)),
    ((64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2)),
    ((64, 64, 4, 4), (32, 64, 4, 3), (128, 64, 4, 3)),
    ((128, 64, 4, 2), (16, 64, 4, 2), (64, 128, 4, 2)),
    ((64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 2, 2)),
]
# Selected attention: (forward (warps, stages), dq (warps, stages), kv-major (warps, stages), KV_TILE_ROWS).
SELECTED = [
    ((2, 3), (2, 3), (4, 2), 64),
    ((1, 3), (1, 3), (4, 3), 64),
    ((2, 2), (2, 2), (8, 2), 128),
    ((1, 2), (1, 2), (4, 2), 128),
    ((2, 4), (2, 4), (2, 2), 32),
]


def tile(spec):
    m, n, warps, stages = spec
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def times_ms(fn, iters, kernels):
    """Mean device ms per call of each named kernel of fn (None if it failed to compile or run)."""
    try:
        t = kernel_times(fn, iters)
    except Exception as e:  # out of shared memory / registers for this tile
        print(f"  ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        torch.cuda.synchronize()
        return [None] * len(kernels)
    return [sum(v for k, v in t.items() if name in k) / 1e3 for name in kernels]


def fmt(x):
    return "-" if x is None else f"{x:.2f}"


def sweep_flash(x, config, scale, iters):
    library = flash.launch_params
    print("\n| branch | fwd tile | fwd ms | dk/dv tile | dk/dv ms | dq tile | dq ms |")
    print("|---|---|---|---|---|---|---|")
    for branch, k, v in (("cmp", x["kc"], x["vc"]), ("swa", x["k"], x["v"])):
        band = branch_band(branch, config)
        for fwd, dkdv, dq in FLASH:
            flash.launch_params = lambda dk, dv, f=fwd, kv=dkdv, q=dq: {
                **library(dk, dv), "fwd": tile(f), "dkdv": tile(kv), "dq": tile(q)}

            def run():
                o, lse = banded_attention_fwd(x["q"], k, v, scale, **band)
                banded_attention_bwd(x["do"], x["q"], k, v, o, lse, scale, **band)
            ms = times_ms(run, iters, ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"))
            print(f"| {branch} | {fwd} | {fmt(ms[0])} | {dkdv} | {fmt(ms[1])} | {dq} | {fmt(ms[2])} |", flush=True)
    flash.launch_params = library


def sweep_selected(x, config, scale, iters):
    library, rows = {k: dict(v) for k, v in selected.LAUNCH.items()}, selected.KV_TILE_ROWS
    ids = nsa.select_blocks(x["q"], x["kc"], config, backend="triton")
    lp = config.slc_block
    print("\n| fwd (warps, stages) | fwd ms | dq (warps, stages) | dq ms | kv (warps, stages) | kv rows | kv ms |")
    print("|---|---|---|---|---|---|---|")
    for fwd, dq, kv, kv_rows in SELECTED:
        for name, (warps, stages) in (("fwd", fwd), ("dq", dq), ("kv", kv)):
            selected.LAUNCH[name] = dict(num_warps=warps, num_stages=stages)
        selected.KV_TILE_ROWS = kv_rows

        def run():
            o, lse = selected_attention_fwd(x["q"], x["k"], x["v"], ids, scale, lp)
            selected_attention_bwd(x["do"], x["q"], x["k"], x["v"], o, lse, ids, scale, lp)
        ms = times_ms(run, iters, ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_kv_kernel"))
        print(f"| {fwd} | {fmt(ms[0])} | {dq} | {fmt(ms[1])} | {kv} | {kv_rows} | {fmt(ms[2])} |", flush=True)
    selected.LAUNCH.update(library)
    selected.KV_TILE_ROWS = rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--shape", default="P", choices=sorted(SHAPES))
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--parts", nargs="+", default=["flash", "selected"], choices=["flash", "selected"])
    args = parser.parse_args()
    config = nsa.NSAConfig()
    Hq, Hkv = SHAPES[args.shape]
    T, D = args.T, 128

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    Tc = config.num_cmp_tokens(T)
    x = dict(q=rand(1, T, Hq, D), k=rand(1, T, Hkv, D), v=rand(1, T, Hkv, D), kc=rand(1, Tc, Hkv, D),
             vc=rand(1, Tc, Hkv, D), do=rand(1, T, Hq, D))
    scale = D ** -0.5
    print(f"shape {args.shape} (Hq {Hq}, Hkv {Hkv}, D {D}), T {T}, bfloat16")
    if "flash" in args.parts:
        sweep_flash(x, config, scale, args.iters)
    if "selected" in args.parts:
        sweep_selected(x, config, scale, args.iters)


if __name__ == "__main__":
    main()
