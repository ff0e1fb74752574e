"""Launch-parameter sweep of the training kernels, CUDA only: per-kernel device time (CUDA profiler) of the
banded flash kernels (compressed and window branches) and of the selected-attention kernels under variants of
their tiles, warps and pipeline stages. Shape P (Hq 64, Hkv 4, D 128) by default, bfloat16, default NSAConfig.

Each variant is one nsa.KernelOptions passed as `options=` to the kernels' host functions (nothing global is
changed). A banded variant sets the forward, dk/dv and dq launches at once (they are separate kernels, timed
apart), so one compile per variant serves three comparisons. The first row of each table is the library's
choice (KernelOptions()). Prints one markdown table per part.

    python benchmarks/tune_kernels.py --T 65536
"""
from __future__ import annotations

import torch

import common
import nsa
from common import fmt, kernel_sum, kernel_times
from nsa import KernelOptions, Launch

# (block_m, block_n, num_warps, num_stages) of the forward, dk/dv and dq kernels, one variant per row; None keeps
# the library's launch of that kernel (the rows that vary dk/dv alone compile only a dk/dv kernel).
BANDED = [
    ((64, 64, 4, 3), (64, 128, 8, 2), (64, 64, 4, 2)),
    ((64, 64, 4, 2), (64, 128, 4, 2), (64, 32, 4, 3)),
    ((64, 128, 4, 2), (32, 128, 4, 2), (32, 64, 4, 2)),
    ((64, 32, 4, 3), (64, 64, 4, 3), (64, 64, 8, 2)),
    ((64, 64, 4, 4), (32, 64, 4, 3), (128, 64, 4, 3)),
    ((128, 64, 4, 2), (16, 64, 4, 2), (64, 128, 4, 2)),
    ((64, 64, 8, 3), (64, 128, 8, 3), (32, 64, 2, 2)),
    (None, (64, 128, 8, 4), None),
    (None, (128, 128, 8, 2), None),
    (None, (128, 128, 8, 3), None),
    (None, (32, 128, 8, 3), None),
    (None, (32, 64, 4, 4), None),
    (None, (64, 64, 8, 3), None),
]
# Selected attention: (forward (warps, stages), dq (warps, stages), kv-major (warps, stages), kv-major rows).
SELECTED = [
    ((2, 3), (2, 3), (4, 2), 64),
    ((1, 3), (1, 3), (4, 3), 64),
    ((2, 2), (2, 2), (8, 2), 128),
    ((1, 2), (1, 2), (4, 2), 128),
    ((2, 4), (2, 4), (2, 2), 32),
]


def tile(spec) -> Launch:
    if spec is None:
        return Launch()
    m, n, warps, stages = spec
    return Launch(block_m=m, block_n=n, num_warps=warps, num_stages=stages)


def banded_options(variant) -> KernelOptions:
    fwd, dkdv, dq = variant
    return KernelOptions(banded_fwd=tile(fwd), banded_dkdv=tile(dkdv), banded_dq=tile(dq))


def selected_options(variant) -> KernelOptions:
    fwd, dq, kv, rows = variant
    return KernelOptions(selected_fwd=Launch(num_warps=fwd[0], num_stages=fwd[1]),
                         selected_dq=Launch(num_warps=dq[0], num_stages=dq[1]),
                         selected_dkdv=Launch(block_m=rows, num_warps=kv[0], num_stages=kv[1]))


def times_ms(fn, iters, kernels):
    """(mean device ms per call of each named kernel of fn, None) or ([None...], reason) when the variant fails
    to compile or run (out of shared memory or registers for this tile)."""
    t, err = common.guarded(kernel_times, fn, iters)
    return ([None] * len(kernels) if t is None else [kernel_sum(t, name) / 1e3 for name in kernels]), err


def sweep_banded(x, config, scale, iters, branches):
    from nsa.ops.triton.banded import banded_attention_bwd, banded_attention_fwd, branch_band

    rows = []
    for branch, k, v in (("cmp", x["kc"], x["vc"]), ("swa", x["k"], x["v"])):
        if branch not in branches:
            continue
        band = branch_band(branch, config)
        for variant in [None, *BANDED]:
            options = KernelOptions() if variant is None else banded_options(variant)

            def run():
                o, lse = banded_attention_fwd(x["q"], k, v, scale, **band, options=options)
                banded_attention_bwd(x["do"], x["q"], k, v, o, lse, scale, **band, options=options)
            ms, err = times_ms(run, iters, ("_banded_fwd_kernel", "_banded_dkdv_kernel", "_banded_dq_kernel"))
            names = ("library",) * 3 if variant is None else [spec or "library" for spec in variant]
            rows.append([branch, names[0], fmt(ms[0], ".2f", err), names[1], fmt(ms[1], ".2f", err),
                         names[2], fmt(ms[2], ".2f", err)])
            print(f"  banded {branch} {names[0]}: done", flush=True)
    print("\nBanded kernels, tile = (block_m, block_n, num_warps, num_stages), ms:\n")
    print(common.table(["branch", "fwd tile", "fwd ms", "dk/dv tile", "dk/dv ms", "dq tile", "dq ms"], rows))


def sweep_selected(x, config, scale, iters):
    from nsa.ops.triton.selected_attention import selected_attention_bwd, selected_attention_fwd

    ids = nsa.select_blocks(x["q"], x["kc"], config, backend="triton")
    lp = config.slc_block
    rows = []
    for variant in [None, *SELECTED]:
        options = KernelOptions() if variant is None else selected_options(variant)

        def run():
            o, lse = selected_attention_fwd(x["q"], x["k"], x["v"], ids, scale, lp, options=options)
            selected_attention_bwd(x["do"], x["q"], x["k"], x["v"], o, lse, ids, scale, lp, options=options)
        ms, err = times_ms(run, iters, ("_selected_fwd_kernel", "_selected_dq_kernel", "_selected_dkdv_kernel"))
        fwd, dq, kv, kv_rows = ("library",) * 4 if variant is None else variant
        rows.append([fwd, fmt(ms[0], ".2f", err), dq, fmt(ms[1], ".2f", err), kv, kv_rows, fmt(ms[2], ".2f", err)])
    print("\nSelected-attention kernels, (num_warps, num_stages), ms:\n")
    print(common.table(["fwd", "fwd ms", "dq", "dq ms", "kv-major", "kv rows", "kv ms"], rows))


def main():
    parser = common.parser(__doc__, out=None, timing=False)
    parser.add_argument("--T", type=int, default=65536)
    parser.add_argument("--shape", default="P", choices=sorted(common.SHAPES))
    parser.add_argument("--iters", type=int, default=3, help="profiled calls per variant")
    parser.add_argument("--parts", nargs="+", default=["banded", "selected"], choices=["banded", "selected"])
    parser.add_argument("--branches", nargs="+", default=["cmp", "swa"], choices=["cmp", "swa"],
                        help="part 'banded': the branches to sweep")
    args = parser.parse_args()
    common.require_cuda("tune_kernels.py")
    config = nsa.NSAConfig()
    shape = common.SHAPES[args.shape]
    x = common.op_inputs(args.T, shape, config, requires_grad=False)
    x = dict(q=x["q"], k=x["k_slc"], v=x["v_slc"], kc=x["k_cmp"], vc=x["v_cmp"], do=torch.randn_like(x["q"]))
    scale = shape.D ** -0.5
    common.print_header(f"training-kernel launch sweep, shape {args.shape} {tuple(shape)}, T {args.T}, bfloat16")
    if "banded" in args.parts:
        sweep_banded(x, config, scale, args.iters, args.branches)
    if "selected" in args.parts:
        sweep_selected(x, config, scale, args.iters)


if __name__ == "__main__":
    main()
