"""GPU check and timing of the banded flash-attention kernels and the block selection, CUDA only.

1. Correctness (bfloat16, T = 2048, Hq = 16, Hkv = 2, D = 128, default NSAConfig): o, dq, dk, dv of both
   branches against the float64 reference branches of ops/reference.py (relative max error), and the
   selection against reference.select_blocks (fraction of identical rows).
2. Timing (triton.testing.do_bench, median ms) at Hq = 64, Hkv = 4, D = 128, bfloat16, for T in --T:
   forward and backward of the compressed and window branches, and the
   selection. TFLOP/s count only the visible query-key pairs: forward 2 * pairs * (Dk + Dv) per head,
   backward 2 * pairs * (3 Dk + 2 Dv) (recompute s, dp, dv, dk, dq).

    python benchmarks/bench_kernels_flash.py --T 8192 32768 65536
"""
from __future__ import annotations

import argparse

import torch
import triton

from nsa import NSAConfig
from nsa.ops import reference
from nsa.ops.triton.flash import banded_attention_bwd, banded_attention_fwd, branch_band
from nsa.ops.triton.selection import select_blocks_fwd

BRANCHES = ("cmp", "swa")



def num_keys(branch, config, T):
    return config.num_cmp_tokens(T) if branch == "cmp" else T


def visible_pairs(branch, config, T):
    t = torch.arange(T, dtype=torch.float64)
    if branch == "cmp":
        return float(((t - config.cmp_block + 1 + config.cmp_stride).clamp(min=0) // config.cmp_stride).sum())
    return float(torch.minimum(t + 1, torch.tensor(float(config.window))).sum())


def rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def reference_branch(q, k, v, branch, config, scale):
    """Float64 branch output [B, T, Hq, Dv] from ops/reference.py's branch functions (differentiable)."""
    B, T, Hq, _ = q.shape
    Hkv = k.shape[2]
    qh = q.transpose(1, 2).unflatten(1, (Hkv, Hq // Hkv))
    kh, vh = k.transpose(1, 2), v.transpose(1, 2)
    t = torch.arange(T, device=q.device)
    if branch == "cmp":
        o = reference._cmp_attention(qh, kh, vh, t, config, scale)[1]
    else:
        o = reference._swa_attention(qh, kh, vh, t, config, scale)
    return o.flatten(1, 2).transpose(1, 2)


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def check(config, T=2048, Hq=16, Hkv=2, D=128):
    scale = D ** -0.5
    print(f"correctness, bfloat16, T={T} Hq={Hq} Hkv={Hkv} D={D}")
    q = rand(1, T, Hq, D)
    for branch in BRANCHES:
        Tk = num_keys(branch, config, T)
        k, v, do = rand(1, Tk, Hkv, D), rand(1, Tk, Hkv, D), rand(1, T, Hq, D)
        o, lse = banded_attention_fwd(q, k, v, scale, **branch_band(branch, config))
        grads = banded_attention_bwd(do, q, k, v, o, lse, scale, **branch_band(branch, config))
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        ref = reference_branch(q64, k64, v64, branch, config, scale)
        ref.backward(do.double())
        errs = [rel_err(x, r) for x, r in zip((o, *grads), (ref, q64.grad, k64.grad, v64.grad))]
        print(f"  {branch}: rel err o {errs[0]:.2e}  dq {errs[1]:.2e}  dk {errs[2]:.2e}  dv {errs[3]:.2e}")
        if branch == "cmp":
            ids = select_blocks_fwd(q, k, lse, config, scale)
            ref_ids = reference.select_blocks(q, k, config, scale)
            same = (ids.long() == ref_ids).all(-1).double().mean().item()
            print(f"  selection: {100 * same:.2f}% rows identical to the reference")


def bench(config, T, Hq=64, Hkv=4, D=128):
    scale = D ** -0.5
    q, do = rand(1, T, Hq, D), rand(1, T, Hq, D)
    for branch in BRANCHES:
        Tk = num_keys(branch, config, T)
        k, v = rand(1, Tk, Hkv, D), rand(1, Tk, Hkv, D)
        kw = branch_band(branch, config)
        o, lse = banded_attention_fwd(q, k, v, scale, **kw)
        flops = 2 * visible_pairs(branch, config, T) * Hq * D
        runs = {
            "fwd": (lambda: banded_attention_fwd(q, k, v, scale, **kw), 2 * flops),
            "bwd": (lambda: banded_attention_bwd(do, q, k, v, o, lse, scale, **kw), 5 * flops),
        }
        for name, (fn, f) in runs.items():
            ms = triton.testing.do_bench(fn, return_mode="median")
            print(f"  T={T:6d} {branch} {name:3s} {ms:9.3f} ms  {f / ms * 1e-9:7.1f} TFLOP/s")
        if branch == "cmp":
            ms = triton.testing.do_bench(lambda: select_blocks_fwd(q, k, lse, config, scale), return_mode="median")
            print(f"  T={T:6d} selection {ms:9.3f} ms  ({flops / ms * 1e-9:.1f} TFLOP/s of q.k_cmp)")
        del k, v, o, lse
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 32768, 65536])
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels_flash.py needs a CUDA device")
    config = NSAConfig()
    if not args.skip_check:
        check(config)
    print(f"timing, bfloat16, Hq=64 Hkv=4 D=128, {config}")
    for T in args.T:
        bench(config, T)


if __name__ == "__main__":
    main()
