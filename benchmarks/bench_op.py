"""The cross-implementation benchmark, CUDA only: the NSA op beside full attention and fla-core's NSA, one run.

Part "op" (B = 1, bfloat16, default NSAConfig; shapes P: Hq 64, Hkv 4, D 128 and S: Hq 32, Hkv 8, D 128), at
each T (8k..128k), forward and forward+backward, median ms (triton.testing.do_bench) and peak memory
(torch.cuda.max_memory_allocated above what was allocated before the call) of:
  nsa         nsa.nsa_attention(backend="triton"): compressed + selection + selected + window branches, gated;
              also each branch alone (compressed, selection, selected, window) unless --no-branches;
  sdpa_flash  torch SDPA, full causal attention, enable_gqa=True, under SDPBackend.FLASH_ATTENTION;
  sdpa_cudnn  the same under SDPBackend.CUDNN_ATTENTION;
  fla         fla-core's fla.ops.nsa.parallel_nsa, when importable (see FLA below).
Ratios: baseline time / NSA time (> 1: NSA faster). Achieved TFLOP/s of our kernels counts useful FLOPs only
(visible query-key pairs; backward 2.5x forward, as FlashAttention counts).

FLA: what fla-core's parallel_nsa computes, read from its source (fla/ops/nsa/parallel.py, 0.6.0), and how it is
fed here: one k, v [B, T, Hkv, D] for all branches (ours take separate k/v per branch; it gets our k_slc, v_slc);
gates g_cmp, g_slc, g_swa [B, T, Hq] (our gates[..., 0/1/2]). It computes inside the call: the compressed keys as
the MEAN of each non-overlapping 64-token block (l = d = 64: T/64 compressed tokens, against our l = 32, d = 16,
T/16 tokens that the op takes as inputs from the layer's compression MLP), compressed attention, the top-16 blocks
(block 64, from the compressed scores; first and two local blocks forced) and selected attention. Its window
branch calls the flash_attn package; without it (window_size = 0 here) fla has NO window branch and the "fla"
cells time three branches against our four: compare with nsa minus our "window" column. It needs Hq / Hkv a
power of two >= 16, so shape S (G = 4) is n/a. Backward: gradients of q, k, v and the gates.
Install on a machine without network from a wheel downloaded beforehand:
    python -m pip install --no-deps --no-index .whl/fla_core-0.6.0-py3-none-any.whl   (needs einops)

Part "model": one training step (forward + backward, bfloat16 autocast, fp32 weights) of
nsa.LanguageModel(ModelConfig(n_layer=2, n_embd=2048, n_head=16, n_kv_head=1, head_dim=128, vocab 256)), B = 1,
attention "nsa" against "full" (SDPA, torch's default backend choice), at --model-T: median ms (CUDA events),
tokens/s, full / nsa time, peak memory. With --compile, each model also runs as torch.compile(model,
fullgraph=True) (inductor): its step time beside the eager one (eager / compiled), and the first compiled step's
wall time (tracing and compiling included).

Every configuration is guarded: an OOM, a missing package or an unsupported shape prints 'n/a (reason)' and the
run goes on. Prints a header (date, GPU, versions, command) and markdown tables; writes results.json and
speedup.png (baseline time / NSA time against T) to --out.

    python benchmarks/bench_op.py --T 8192 16384 32768 65536 131072 --warmup 10 --rep 25 --out bench_out
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import time

import torch

import common
import nsa
from common import OP_NAMES, SHAPES, fmt, measure, op_args, op_inputs, ratio
from nsa import NSAConfig

BRANCHES = ("compressed", "selection", "selected", "window")
BASELINES = ("sdpa_flash", "sdpa_cudnn", "fla")


# ----------------------------------------------------------------------------------------------------------------
# The op and its branches
# ----------------------------------------------------------------------------------------------------------------

def visible_pairs(T, config):
    """Visible query-key pairs per head of each branch (and of full causal attention)."""
    t = torch.arange(T, dtype=torch.float64)
    l, d, lp, n, w = config.cmp_block, config.cmp_stride, config.slc_block, config.num_selected, config.window
    cmp = torch.where(t >= l - 1, torch.floor((t - l + 1) / d) + 1, torch.zeros_like(t)).sum().item()
    J = torch.floor(t / lp)
    slc = ((torch.clamp(J + 1, max=n) - 1) * lp + (t - J * lp + 1)).sum().item()
    swa = torch.clamp(t + 1, max=w).sum().item()
    return dict(compressed=cmp, selection=cmp, selected=slc, window=swa, nsa=cmp + slc + swa, full=T * (T + 1) / 2)


# --streams: the op also with the other setting of KernelOptions.concurrent_branches than the default, under its name
STREAMS = nsa.KernelOptions(concurrent_branches=not nsa.KernelOptions().concurrent_branches)
STREAMS_KEY = "nsa_two_streams" if STREAMS.concurrent_branches else "nsa_one_stream"
STREAMS_LABEL = STREAMS_KEY[4:].replace("_", " ")


def op_fns(x, config, options=None):
    """(forward, forward+backward) of the whole op (kernel_options=options)."""
    do = torch.randn_like(x["q"][..., :x["v_cmp"].shape[-1]])
    args = op_args(x)

    def fwd():
        with torch.no_grad():
            return nsa.nsa_attention(*args, config, backend="triton", kernel_options=options)

    def fwd_bwd():
        return torch.autograd.grad(nsa.nsa_attention(*args, config, backend="triton", kernel_options=options), args, do)
    return fwd, fwd_bwd


def branch_fns(x, config, scale):
    """name -> (forward fn, forward+backward fn or None) of each branch alone, through the kernels' host
    functions with the library's launch choices."""
    from nsa.ops.triton.banded import banded_attention_bwd, banded_attention_fwd, branch_band
    from nsa.ops.triton.selected_attention import selected_attention_bwd, selected_attention_fwd
    from nsa.ops.triton.topn import select_blocks_fwd

    q, kc, vc, ks, vs, kw, vw = (x[n].detach() for n in OP_NAMES[:7])
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


def check_correctness(config, T=2048):
    """Triton op vs the float32 reference (bfloat16 inputs) on rows whose block selections agree."""
    for name, (Hq, Hkv) in {"G16": (16, 1), "G4": (8, 2)}.items():
        x = {k: v.detach() for k, v in op_inputs(T, common.Shape(Hq, Hkv, 128), config, seed=1).items()}
        o = nsa.nsa_attention(*op_args(x), config, backend="triton").float()
        x32 = {k: v.float() for k, v in x.items()}
        o_ref = nsa.nsa_attention(*op_args(x32), config, backend="reference")
        ids = nsa.select_blocks(x["q"], x["k_cmp"], config, backend="triton")
        ids_ref = nsa.select_blocks(x32["q"], x32["k_cmp"], config, backend="reference")
        match = (ids == ids_ref).all(-1)
        rows = match.repeat_interleave(Hq // Hkv, dim=2)
        err = ((o - o_ref)[rows].norm() / o_ref[rows].norm()).item()
        print(f"check {name} T={T}: selections agree on {match.float().mean().item():.4f} of rows; "
              f"relative error of o there {err:.2e}")
        if err > 2e-2:
            raise SystemExit(f"correctness check failed for {name}: relative error {err:.3g}")


# ----------------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------------

def sdpa_fns(x, backend):
    """(forward, forward+backward) of torch SDPA causal attention with GQA under one backend, over the window
    branch's keys and values (any [B, T, Hkv, D] pair would do)."""
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


def fla_status(config):
    """(parallel_nsa or None, note): what fla-core computes in this run, or why it is n/a."""
    try:
        from fla.ops.nsa import parallel_nsa
    except Exception as e:  # not installed, or an import-time failure (a missing dependency)
        return None, f"fla-core not importable: {common.reason(e)}"
    if importlib.util.find_spec("flash_attn") is not None:  # fla's window branch calls it
        window, win_note = config.window, f"window {config.window} through flash_attn"
    else:
        window, win_note = 0, "NO window branch (flash_attn not installed: window_size=0)"
    version = importlib.metadata.version("fla-core")
    note = (f"fla-core {version} parallel_nsa: compressed = mean of 64-token blocks (l = d = {config.slc_block}), "
            f"top-{config.num_selected} selection of {config.slc_block}-token blocks, selected attention, "
            f"{win_note}; one k/v for all branches")
    return (parallel_nsa, window), note


def fla_fns(x, config, fla):
    """(forward, forward+backward) of fla's parallel_nsa fed our inputs: q, k = k_slc, v = v_slc, gates split."""
    parallel_nsa, window = fla
    Hq, Hkv = x["q"].shape[2], x["k_slc"].shape[2]
    G = Hq // Hkv
    if G < 16 or G & (G - 1):
        raise ValueError(f"fla's parallel_nsa needs Hq/Hkv a power of two >= 16, here {G}")
    q = x["q"].detach().requires_grad_()
    k = x["k_slc"].detach().requires_grad_()
    v = x["v_slc"].detach().requires_grad_()
    g = [x["gates"].detach()[..., i].contiguous().requires_grad_() for i in range(3)]
    do = torch.randn_like(q[..., :v.shape[-1]])
    leaves = (q, k, v, *g)

    def run():
        return parallel_nsa(q, k, v, g_cmp=g[0], g_slc=g[1], g_swa=g[2], block_counts=config.num_selected,
                            block_size=config.slc_block, window_size=window, scale=q.shape[-1] ** -0.5)

    def fwd():
        with torch.no_grad():
            return run()

    def fwd_bwd():
        return torch.autograd.grad(run(), leaves, do, allow_unused=True)
    return fwd, fwd_bwd


# ----------------------------------------------------------------------------------------------------------------
# Part "op"
# ----------------------------------------------------------------------------------------------------------------

def shape_line(rec) -> str:
    """One line of run_shape's result as it is measured: each implementation's fwd / fwd+bwd ms."""
    if "error" in rec:
        return f"{rec['shape']} T={rec['T']}: {rec['error']}"
    cells = [f"{name} " + " / ".join(common.fmt(m.get("ms"), ".2f", m.get("error") and "error") for m in modes.values())
             for name, modes in rec["kernels"].items()]
    return f"{rec['shape']} T={rec['T']} fwd / fwd+bwd ms: " + ", ".join(cells)


def run_shape(shape_name, T, config, args, fla):
    from torch.nn.attention import SDPBackend

    shape = SHAPES[shape_name]
    out = {"shape": shape_name, "T": T, **shape._asdict(), "kernels": {}}
    x, err = common.guarded(op_inputs, T, shape, config)
    if err:
        out["error"] = err
        return out
    scale = shape.D ** -0.5
    pairs = visible_pairs(T, config)
    makers = {"nsa": lambda: op_fns(x, config)}
    if args.streams:
        makers[STREAMS_KEY] = lambda: op_fns(x, config, STREAMS)
    if not args.no_branches:
        makers["branches"] = lambda: branch_fns(x, config, scale)
    makers["sdpa_flash"] = lambda: sdpa_fns(x, SDPBackend.FLASH_ATTENTION)
    makers["sdpa_cudnn"] = lambda: sdpa_fns(x, SDPBackend.CUDNN_ATTENTION)
    makers["fla"] = (lambda: fla_fns(x, config, fla[0])) if fla[0] else None
    for name, make in makers.items():
        if make is None:
            out["kernels"][name] = {m: dict(ms=None, peak_mib=None, error=fla[1]) for m in ("fwd", "fwd_bwd")}
            continue
        fns, err = common.guarded(make)
        if err:
            out["kernels"][name] = {m: dict(ms=None, peak_mib=None, error=err) for m in ("fwd", "fwd_bwd")}
            continue
        for kname, (fwd, fwd_bwd) in (fns.items() if name == "branches" else [(name, fns)]):
            key = "full" if kname.startswith("sdpa") else kname
            rec = {}
            for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                if fn is None:
                    continue
                rec[mode] = measure(fn, args.warmup, args.rep)
                if key in pairs and rec[mode]["ms"] is not None:
                    flops = 2 * shape.Hq * pairs[key] * 2 * shape.D * (0.5 if kname == "selection" else 1.0)
                    rec[mode]["tflops"] = flops * (3.5 if mode == "fwd_bwd" else 1.0) / rec[mode]["ms"] / 1e9
            out["kernels"][kname] = rec
        del fns
        torch.cuda.empty_cache()
    return out  # x and the closures over it go with this frame (run_model's caller empties the cache)


def _rec(r, name, mode):
    return r["kernels"].get(name, {}).get(mode) or {}


def _ms(r, name, mode):
    return _rec(r, name, mode).get("ms")


def op_table(results, branches):
    other = [STREAMS_KEY] if any(STREAMS_KEY in r.get("kernels", {}) for r in results) else []
    cols = ["nsa", *other, *(BRANCHES if branches else ()), *BASELINES]
    headers = ["shape", "T", "mode", *(f"{c} ms" for c in cols), "flash / nsa", "cuDNN / nsa", "fla / nsa",
               *([f"{STREAMS_LABEL} / nsa", f"{STREAMS_LABEL} MiB"] if other else []), "nsa MiB", "cuDNN MiB", "fla MiB"]
    rows = []
    for r in results:
        for mode in ("fwd", "fwd_bwd"):
            if r.get("error"):
                rows.append([r["shape"], r["T"], mode, f"n/a ({r['error']})"] + [""] * (len(headers) - 4))
                continue
            cells = [fmt(_ms(r, c, mode), ".2f", _rec(r, c, mode).get("error")) if c in r["kernels"] else "-"
                     for c in cols]
            nsa_ms = _ms(r, "nsa", mode)
            speed = [ratio(_ms(r, b, mode), nsa_ms) for b in BASELINES]
            speed += [ratio(_ms(r, c, mode), nsa_ms) for c in other]
            speed += [fmt(_rec(r, c, mode).get("peak_mib"), ".0f") for c in other]
            peaks = [fmt(_rec(r, c, mode).get("peak_mib"), ".0f") for c in ("nsa", "sdpa_cudnn", "fla")]
            rows.append([r["shape"], r["T"], mode, *cells, *speed, *peaks])
    return common.table(headers, rows)


def tflops_lines(results):
    lines = []
    for r in results:
        parts = [f"{c}/{m} {rec['tflops']:.0f}" for c, recs in r["kernels"].items() for m, rec in recs.items()
                 if rec.get("tflops") is not None]
        if parts:
            lines.append(f"  {r['shape']} T={r['T']}: " + ", ".join(parts))
    return "\n".join(lines)


def plot(results, model, path):
    """Baseline time / NSA time against T: op forward, op forward+backward, and the model step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
        for shape in sorted({r["shape"] for r in results}):
            rs = sorted((r for r in results if r["shape"] == shape), key=lambda r: r["T"])
            for base, style in (("sdpa_flash", "-o"), ("sdpa_cudnn", "--s"), ("fla", ":^")):
                pts = [(r["T"], _ms(r, base, mode) / _ms(r, "nsa", mode)) for r in rs
                       if _ms(r, base, mode) and _ms(r, "nsa", mode)]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{shape}: {base} / nsa")
        ax.set_title("op, forward" if mode == "fwd" else "op, forward + backward")
    ax = axes[2]
    pts = sorted((m["T"], m["full_ms"] / m["nsa_ms"]) for m in model if m.get("nsa_ms") and m.get("full_ms"))
    if pts:
        ax.plot(*zip(*pts), "-o", label="full / nsa")
    ax.set_title("model training step (2 layers, n_embd 2048)")
    for ax in axes:
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("T")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("time of baseline / time of NSA (> 1: NSA faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------------------------
# Part "model"
# ----------------------------------------------------------------------------------------------------------------

def model_config(attention):
    return nsa.ModelConfig(vocab_size=256, n_layer=2, n_embd=2048, n_head=16, n_kv_head=1, head_dim=128,
                           attention=attention)


def training_step(attention, T, compiled=False, options=None):
    """(step, model): step() runs one forward+backward of the model on B = 1 random tokens (bf16 autocast), eager
    or through torch.compile(model, fullgraph=True); options: the NSA layers' kernel_options."""
    model = nsa.LanguageModel(model_config(attention), kernel_options=options).cuda().train()
    forward = torch.compile(model, fullgraph=True) if compiled else model
    idx = torch.randint(0, 256, (1, T + 1), device="cuda")
    inputs, targets = idx[:, :-1], idx[:, 1:]

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = forward(inputs, targets)
        loss.backward()
    return step, model


def model_step(attention, T, iters, compiled=False, options=None):
    """{ms, peak_mib, tok_s, params, first_step_s} of training_step, eager or compiled (first_step_s: the first
    step's wall time, which compiles when compiled)."""
    step, model = training_step(attention, T, compiled, options)
    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_step_s = time.perf_counter() - start
    rec = measure(step, timer="events", iters=iters)
    rec.update(tok_s=None if rec["ms"] is None else T / rec["ms"] * 1e3, params=model.num_params(),
               first_step_s=first_step_s)
    return rec  # the model goes with this frame; run_model empties the cache


def model_variants(compile_too, streams=False):
    """(key prefix, attention, compiled, kernel options) of the measured models: eager nsa and full, compiled ones
    too, and eager nsa with the other stream setting (STREAMS)."""
    modes = (False, True) if compile_too else (False,)
    variants = [(attention + ("_compiled" if compiled else ""), attention, compiled, None)
                for compiled in modes for attention in ("nsa", "full")]
    return variants + ([(STREAMS_KEY, "nsa", False, STREAMS)] if streams else [])


def run_model(Ts, iters, compile_too=False, on_row=None, streams=False):
    """One row per T of model_variants' step times; on_row(rows so far) after each row, and each step's time is
    printed as it is measured."""
    rows = []
    for T in Ts:
        row = {"T": T}
        for key, attention, compiled, options in model_variants(compile_too, streams):
            print(f"model step {key} T={T} ...", flush=True)
            rec, err = common.guarded(model_step, attention, T, iters, compiled, options)
            torch.cuda.empty_cache()
            rec = rec or dict(ms=None, peak_mib=None, tok_s=None, error=err)
            print(f"  {common.fmt(rec['ms'], '.2f', err)} ms", flush=True)
            row.update({f"{key}_ms": rec["ms"], f"{key}_tok_s": rec["tok_s"], f"{key}_peak_mib": rec["peak_mib"],
                        f"{key}_error": rec["error"], f"{key}_first_step_s": rec.get("first_step_s"),
                        "params_" + attention: rec.get("params")})
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def model_table(rows, compile_too=False):
    other = any(f"{STREAMS_KEY}_ms" in r for r in rows)
    keys = [key for key, *_ in model_variants(compile_too, other)]
    headers = ["T"]
    for key in keys:
        headers += [f"{key} ms", f"{key} tokens/s", f"{key} MiB"] + (["first step s"] if key.endswith("compiled") else [])
    headers += ["full / nsa"] + (["full / nsa compiled", "nsa eager / compiled", "full eager / compiled"]
                                 if compile_too else []) + ([f"{STREAMS_LABEL} / nsa"] if other else [])
    out = []
    for r in rows:
        cells = []
        for key in keys:
            err = r[f"{key}_error"]
            cells += [fmt(r[f"{key}_ms"], ".1f", err), fmt(r[f"{key}_tok_s"], ".0f", err),
                      fmt(r[f"{key}_peak_mib"], ".0f")]
            if key.endswith("compiled"):
                cells.append(fmt(r[f"{key}_first_step_s"], ".1f"))
        cells.append(ratio(r["full_ms"], r["nsa_ms"]))
        if compile_too:
            cells += [ratio(r["full_compiled_ms"], r["nsa_compiled_ms"]), ratio(r["nsa_ms"], r["nsa_compiled_ms"]),
                      ratio(r["full_ms"], r["full_compiled_ms"])]
        if other:
            cells.append(ratio(r[f"{STREAMS_KEY}_ms"], r["nsa_ms"]))
        out.append([r["T"], *cells])
    return common.table(headers, out)


# ----------------------------------------------------------------------------------------------------------------

def main():
    parser = common.parser(__doc__)
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072],
                        help="sequence lengths of part 'op'")
    parser.add_argument("--shapes", nargs="+", default=["P", "S"], choices=sorted(SHAPES))
    parser.add_argument("--parts", nargs="+", default=["op", "model"], choices=["op", "model"])
    parser.add_argument("--no-branches", action="store_true", help="part 'op': skip the branch-alone timings")
    parser.add_argument("--model-T", type=int, nargs="+", default=[8192, 32768, 65536],
                        help="sequence lengths of part 'model'")
    parser.add_argument("--model-iters", type=int, default=5, help="part 'model': timed steps (after 2 warm-up)")
    parser.add_argument("--compile", action="store_true",
                        help="part 'model': also time torch.compile(model, fullgraph=True) steps, beside eager")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    parser.add_argument("--streams", action="store_true",
                        help="also time the op and the nsa model step with the other KernelOptions.concurrent_branches")
    args = parser.parse_args()
    common.require_cuda("bench_op.py")
    env = common.environment()
    config = NSAConfig()
    if not args.no_check and "op" in args.parts:
        check_correctness(config)
    results, model, fla_note = [], [], None
    meta = dict(env, config=config, args=vars(args), fla=None)
    if "op" in args.parts:
        fla = fla_status(config)
        fla_note = meta["fla"] = fla[1]
        print(fla_note, flush=True)
        for shape in args.shapes:
            for T in args.T:
                print(f"op {shape} T={T} ...", flush=True)
                results.append(run_shape(shape, T, config, args, fla))
                print("  " + shape_line(results[-1]), flush=True)
                common.write_json(args.out, meta, op=results, model=model)  # so far: a timeout keeps what ran
                torch.cuda.empty_cache()
    if "model" in args.parts:
        model = run_model(args.model_T, args.model_iters, args.compile,
                          lambda rows: common.write_json(args.out, meta, op=results, model=rows), args.streams)

    common.print_header("NSA op against SDPA and fla-core; model training step", env)
    if results:
        print(f"\nOp, B = 1, bfloat16, median ms (do_bench); ratio = baseline ms / nsa ms; MiB = peak above inputs.\n"
              f"fla: {fla_note}.\n")
        print(op_table(results, not args.no_branches))
        print("\nTFLOP/s (useful FLOPs):\n" + tflops_lines(results))
    if model:
        cfg = model_config("nsa")
        print(f"\nModel training step: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, n_head {cfg.n_head}, n_kv_head "
              f"{cfg.n_kv_head}, head_dim {cfg.head_dim}, vocab {cfg.vocab_size}, B = 1, bf16 autocast, forward + "
              f"backward; median of {args.model_iters} (CUDA events)"
              + ("; eager and torch.compile(fullgraph=True)" if args.compile else "") + ".\n")
        print(model_table(model, args.compile))
    path = common.write_json(args.out, meta, op=results, model=model)
    png = f"{args.out}/speedup.png"
    _, err = common.guarded(plot, results, model, png)
    print(f"\nwrote {path}" + (f" and {png}" if err is None else f"; no plot ({err})"))


if __name__ == "__main__":
    main()
