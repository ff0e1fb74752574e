"""Where the training-path block selection's time goes, CUDA only: per-kernel device time of select_blocks
(backend="triton": the compressed branch's log-sum-exp pass, _group_score_kernel, _top_n_kernel) under tile
variants of the two selection kernels. Shapes P (Hq 64, Hkv 4) and S (Hq 32, Hkv 8), D 128, bfloat16.

    PYTHONPATH=src:benchmarks python benchmarks/profile_selection.py --T 65536
"""
from __future__ import annotations

import argparse

import torch

import nsa
from nsa.ops.triton import selection

from profile_decode import kernel_times

SHAPES = {"P": (64, 4), "S": (32, 8)}
SCORE = selection._score_params
TOP_N = selection._top_n_params


def variants():
    """(name, score-params override, top-n-params override); {} keeps the library's choice."""
    yield "library", {}, {}
    for rows, warps in ((1, 1), (1, 2), (1, 4), (2, 4), (4, 4), (4, 8)):
        yield f"top-n {rows} rows {warps} warps", {}, dict(BLOCK_R=rows, num_warps=warps)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[65536])
    parser.add_argument("--shapes", nargs="+", default=["P", "S"])
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    config = nsa.NSAConfig()
    print("| shape | T | variant | lse pass ms | group score ms | top-n ms |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes:
        Hq, Hkv = SHAPES[shape]
        for T in args.T:
            q = torch.randn(1, T, Hq, 128, device="cuda", dtype=torch.bfloat16)
            k_cmp = torch.randn(1, config.num_cmp_tokens(T), Hkv, 128, device="cuda", dtype=torch.bfloat16)
            for name, score_over, top_over in variants():
                selection._score_params = lambda *a, o=score_over: {**SCORE(*a), **o}
                selection._top_n_params = lambda *a, o=top_over: {**TOP_N(*a), **o}
                t = kernel_times(lambda: nsa.select_blocks(q, k_cmp, config, backend="triton"), args.iters)
                ms = [sum(v for k, v in t.items() if key in k) / 1e3
                      for key in ("_fwd_kernel", "_group_score_kernel", "_top_n_kernel")]
                print(f"| {shape} | {T} | {name} | " + " | ".join(f"{m:.2f}" for m in ms) + " |", flush=True)
            selection._score_params, selection._top_n_params = SCORE, TOP_N


if __name__ == "__main__":
    main()
