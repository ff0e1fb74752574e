"""Benchmark of the NSA op (Triton backend) against full causal attention (torch SDPA), CUDA only.

Shapes (B = 1, bfloat16, default NSAConfig):
  P: Hq = 64, Hkv = 4,  Dk = Dv = 128   (G = 16, the paper's setting)
  S: Hq = 32, Hkv = 8,  Dk = Dv = 128   (G = 4)
For each T: forward and forward+backward time (triton.testing.do_bench, median) of the whole op and of
each branch alone (compressed, selection, selected, window), and of torch SDPA causal with
enable_gqa=True under the flash and the cuDNN backends, measured in the same run; peak memory
(torch.cuda.max_memory_allocated above the inputs) and achieved TFLOP/s (useful FLOPs: only the
visible query-key pairs; backward counted as 2.5x forward, as FlashAttention does).
Prints a markdown table; writes results.json and speedup.png (SDPA time / NSA time vs T) to --out.

    python benchmarks/bench_op.py --T 8192 16384 --shapes P S --out bench_out
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

import nsa
from nsa import NSAConfig

SHAPES = {"P": dict(Hq=64, Hkv=4, D=128), "S": dict(Hq=32, Hkv=8, D=128)}
NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates")


def make_inputs(T, Hq, Hkv, D, config, dtype=torch.bfloat16, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    Tc = config.num_cmp_tokens(T)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)

    x = dict(q=rand(1, T, Hq, D), k_cmp=rand(1, Tc, Hkv, D), v_cmp=rand(1, Tc, Hkv, D), k_slc=rand(1, T, Hkv, D),
             v_slc=rand(1, T, Hkv, D), k_swa=rand(1, T, Hkv, D), v_swa=rand(1, T, Hkv, D),
             gates=torch.sigmoid(rand(1, T, Hq, 3)))
    return {k: v.requires_grad_() for k, v in x.items()}


def visible_pairs(T, config):
    """Visible query-key pairs per head of each branch (and of full causal attention)."""
    t = torch.arange(T, dtype=torch.float64)
    l, d, lp, n, w = config.cmp_block, config.cmp_stride, config.slc_block, config.num_selected, config.window
    cmp = torch.where(t >= l - 1, torch.floor((t - l + 1) / d) + 1, torch.zeros_like(t)).sum().item()
    J = torch.floor(t / lp)
    slc = ((torch.clamp(J + 1, max=n) - 1) * lp + (t - J * lp + 1)).sum().item()
    swa = torch.clamp(t + 1, max=w).sum().item()
    return dict(compressed=cmp, selection=cmp, selected=slc, window=swa, nsa=cmp + slc + swa, full=T * (T + 1) / 2)


def bench(fn, warmup, rep):
    """(median ms, peak extra MiB) of fn(); (None, None) with the error when it cannot run."""
    import triton.testing
    try:
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"), peak, None
    except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as e:
        torch.cuda.empty_cache()
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def branch_fns(x, config, scale):
    """name -> (forward fn, forward+backward fn or None) of each branch alone."""
    from nsa.ops.triton.flash import banded_attention_bwd, banded_attention_fwd, branch_band
    from nsa.ops.triton.selected import selected_attention_bwd, selected_attention_fwd
    from nsa.ops.triton.selection import select_blocks_fwd

    q, kc, vc, ks, vs, kw, vw = (x[n].detach() for n in NAMES[:7])
    cmp_band, swa_band = branch_band("cmp", config), branch_band("swa", config)
    o_cmp, lse_cmp = banded_attention_fwd(q, kc, vc, scale, **cmp_band)
    ids = select_blocks_fwd(q, kc, lse_cmp, config, scale)
    do = torch.randn_like(o_cmp)

    def banded(k, v, band):
        def fwd():
            return banded_attention_fwd(q, k, v, scale, **band)

        def fwd_bwd():
            o, lse = fwd()
            return banded_attention_bwd(do, q, k, v, o, lse, scale, **band)
        return fwd, fwd_bwd

    def slc_fwd():
        return selected_attention_fwd(q, ks, vs, ids, scale, config.slc_block)

    def slc_fwd_bwd():
        o, lse = slc_fwd()
        return selected_attention_bwd(do, q, ks, vs, o, lse, ids, scale, config.slc_block)

    return {"compressed": banded(kc, vc, cmp_band),
            "selection": (lambda: select_blocks_fwd(q, kc, lse_cmp, config, scale), None),
            "selected": (slc_fwd, slc_fwd_bwd),
            "window": banded(kw, vw, swa_band)}


def op_fns(x, config):
    do = torch.randn_like(x["q"][..., :x["v_cmp"].shape[-1]])

    def fwd():
        with torch.no_grad():
            return nsa.nsa_attention(*(x[n] for n in NAMES), config, backend="triton")

    def fwd_bwd():
        o = nsa.nsa_attention(*(x[n] for n in NAMES), config, backend="triton")
        return torch.autograd.grad(o, [x[n] for n in NAMES], do)
    return fwd, fwd_bwd


def sdpa_fns(x, backend):
    from torch.nn.attention import sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    q = x["q"].detach().transpose(1, 2).requires_grad_()
    k = x["k_swa"].detach().transpose(1, 2).requires_grad_()
    v = x["v_swa"].detach().transpose(1, 2).requires_grad_()
    do = torch.randn_like(q[..., :v.shape[-1]])

    def run():
        with sdpa_kernel(backend):
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    def fwd():
        with torch.no_grad():
            return run()

    def fwd_bwd():
        return torch.autograd.grad(run(), (q, k, v), do)
    return fwd, fwd_bwd


def check_correctness(config, T=2048):
    """Triton op vs the float32 reference (bfloat16 inputs) on rows whose block selections agree."""
    for name, (Hq, Hkv) in {"G16": (16, 1), "G4": (8, 2)}.items():
        x = {k: v.detach() for k, v in make_inputs(T, Hq, Hkv, 128, config, seed=1).items()}
        o = nsa.nsa_attention(*(x[n] for n in NAMES), config, backend="triton").float()
        x32 = {k: v.float() for k, v in x.items()}
        o_ref = nsa.nsa_attention(*(x32[n] for n in NAMES), config, backend="reference")
        ids = nsa.select_blocks(x["q"], x["k_cmp"], config, backend="triton")
        ids_ref = nsa.select_blocks(x32["q"], x32["k_cmp"], config, backend="reference")
        match = (ids == ids_ref).all(-1)
        rows = match.repeat_interleave(Hq // Hkv, dim=2)
        err = ((o - o_ref)[rows].norm() / o_ref[rows].norm()).item()
        print(f"check {name} T={T}: selections agree on {match.float().mean().item():.4f} of rows; "
              f"relative error of o there {err:.2e}")
        if err > 2e-2:
            raise SystemExit(f"correctness check failed for {name}: relative error {err:.3g}")


def run_shape(shape, T, config, warmup, rep):
    from torch.nn.attention import SDPBackend

    dims = SHAPES[shape]
    Hq, Hkv, D = dims["Hq"], dims["Hkv"], dims["D"]
    x = make_inputs(T, Hq, Hkv, D, config)
    scale = D ** -0.5
    pairs = visible_pairs(T, config)
    fns = {"nsa": op_fns(x, config), **branch_fns(x, config, scale),
           "sdpa_flash": sdpa_fns(x, SDPBackend.FLASH_ATTENTION),
           "sdpa_cudnn": sdpa_fns(x, SDPBackend.CUDNN_ATTENTION)}
    out = {"shape": shape, "T": T, **dims, "kernels": {}}
    for name, (fwd, fwd_bwd) in fns.items():
        key = "full" if name.startswith("sdpa") else name
        flops_fwd = 2 * Hq * pairs[key] * (D + D) * (0.5 if name == "selection" else 1.0)  # selection: q.k only
        rec = {}
        for mode, fn, flops in (("fwd", fwd, flops_fwd), ("fwd_bwd", fwd_bwd, 3.5 * flops_fwd)):
            if fn is None:
                continue
            ms, peak, err = bench(fn, warmup, rep)
            rec[mode] = dict(ms=ms, peak_mib=peak, tflops=None if ms is None else flops / ms / 1e9, error=err)
        out["kernels"][name] = rec
    del x, fns
    torch.cuda.empty_cache()
    return out


def _ms(r, name, mode):
    rec = r["kernels"].get(name, {}).get(mode)
    return None if rec is None else rec["ms"]


def print_table(results):
    cols = ["nsa", "compressed", "selection", "selected", "window", "sdpa_flash", "sdpa_cudnn"]
    print("\n| shape | T | mode | " + " | ".join(cols) + " | vs flash | vs cuDNN | NSA peak MiB |")
    print("|" + "---|" * (len(cols) + 6))
    for r in results:
        for mode in ("fwd", "fwd_bwd"):
            ms = [_ms(r, c, mode) for c in cols]
            cells = ["-" if m is None else f"{m:.2f}" for m in ms]
            speed = ["-" if (ms[0] is None or b is None) else f"{b / ms[0]:.2f}x" for b in ms[-2:]]
            peak = r["kernels"]["nsa"].get(mode, {}).get("peak_mib")
            print(f"| {r['shape']} | {r['T']} | {mode} | " + " | ".join(cells) + f" | {' | '.join(speed)} | "
                  + ("-" if peak is None else f"{peak:.0f}") + " |")
    print("\nTFLOP/s (useful FLOPs):")
    for r in results:
        parts = [f"{c}/{m} {r['kernels'][c][m]['tflops']:.0f}" for c in cols for m in ("fwd", "fwd_bwd")
                 if m in r["kernels"].get(c, {}) and r["kernels"][c][m]["tflops"] is not None]
        print(f"  {r['shape']} T={r['T']}: " + ", ".join(parts))


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
        for shape in sorted({r["shape"] for r in results}):
            rs = sorted((r for r in results if r["shape"] == shape), key=lambda r: r["T"])
            for base, style in (("sdpa_flash", "-o"), ("sdpa_cudnn", "--s")):
                pts = [(r["T"], _ms(r, base, mode) / _ms(r, "nsa", mode)) for r in rs
                       if _ms(r, base, mode) and _ms(r, "nsa", mode)]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{shape}: vs SDPA {base.split('_')[1]}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T")
        ax.set_title("forward" if mode == "fwd" else "forward + backward")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup of NSA (SDPA time / NSA time)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--shapes", nargs="+", default=["P", "S"], choices=sorted(SHAPES))
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_op.py needs a CUDA device")
    config = NSAConfig()
    if not args.no_check:
        check_correctness(config)
    results = []
    for shape in args.shapes:
        for T in args.T:
            print(f"running {shape} T={T} ...", flush=True)
            results.append(run_shape(shape, T, config, args.warmup, args.rep))
    print_table(results)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, config=dataclasses.asdict(config))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    plot(results, os.path.join(args.out, "speedup.png"))
    print(f"wrote {args.out}/results.json and {args.out}/speedup.png")


if __name__ == "__main__":
    main()
