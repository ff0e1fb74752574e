"""What the benchmark scripts share: shapes, input factories, timing, profiling, memory, environment, output.

Every script in this folder runs as `python benchmarks/NAME.py ...`: Python puts the script's own folder first
on sys.path, so `import common` finds this file; `nsa` comes from the installed package or PYTHONPATH=src.
Importing this module needs neither CUDA nor Triton (both are imported where they are used), so every script
parses `--help` on any machine.

Conventions of every measurement here:
- shapes P (Hq 64, Hkv 4, D 128; G = 16, the paper's) and S (Hq 32, Hkv 8, D 128; G = 4), bfloat16, B = 1 unless
  a script says otherwise, default NSAConfig;
- time: median of triton.testing.do_bench (its warm-up excluded; it flushes the L2 between runs), or CUDA events
  around calls after warm-up calls; where one input set could stay in the L2 across calls (decoding caches), the
  calls rotate over several independent input sets (`rotating`);
- each measured configuration is guarded (`guarded`): an OOM, a missing package or a kernel that does not
  compile gives "n/a (reason)" in its cell and the run goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import platform
import shlex
import sys
from typing import Callable, NamedTuple

import torch

DTYPE = torch.bfloat16


class Shape(NamedTuple):
    Hq: int
    Hkv: int
    D: int


SHAPES = {"P": Shape(Hq=64, Hkv=4, D=128), "S": Shape(Hq=32, Hkv=8, D=128)}

# The models of the end-to-end decoding measurements (bench_decode.py, profile_decode.py), as ModelConfig keywords:
# the small demo model (head dim 64) and a wide one (head dim 128, one KV head).
MODELS = {"small": dict(n_embd=512, n_head=8, n_kv_head=2),
          "wide": dict(n_embd=2048, n_head=16, n_kv_head=1, head_dim=128)}

# nsa_attention's eight tensors, in its argument order (nsa.NSAInputs._fields, spelled out so that this module
# imports without nsa).
OP_NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates")
# The decoding cache buffers, in nsa_decode_attention's order (after q, before gates and seq_lens).
CACHE_NAMES = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa")


# ----------------------------------------------------------------------------------------------------------------
# Arguments and environment
# ----------------------------------------------------------------------------------------------------------------

def parser(doc: str, *, out: str | None = "bench_out", timing: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser showing the script's docstring, with the shared options (--out, --warmup, --rep)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if out is not None:
        p.add_argument("--out", default=out, help="folder for results.json (and plots); created if missing")
    if timing:
        p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
        p.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    return p


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA device")


def environment() -> dict:
    """Date, GPU, driver, library versions and the command line of this run."""
    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
               triton=version("triton"), nsa=version("nsa"), fla_core=version("fla-core"),
               command=" ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]))
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(0), sms=props.multi_processor_count,
                   gpu_mem_gib=round(props.total_memory / 2**30, 1), driver=_driver_version())
    return env


def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def print_header(title: str, env: dict | None = None) -> dict:
    """Prints the run's environment as a markdown heading and line (the form BENCHMARKS.md records); returns it."""
    env = env or environment()
    gpu = env.get("gpu", "no GPU")
    driver = f" (driver {env['driver']})" if env.get("driver") else ""
    print(f"\n## {env['date']} · {title} · {gpu}{driver} · torch {env['torch']} · triton {env['triton']}"
          + (f" · fla-core {env['fla_core']}" if env.get("fla_core") else ""))
    print(f"\n```bash\n{env['command']}\n```", flush=True)
    return env


def write_json(out_dir: str, meta: dict, name: str = "results.json", **sections) -> str:
    """Writes {"meta": meta, **sections} to out_dir/name (dataclasses become dicts); returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)

    def default(x):
        if dataclasses.is_dataclass(x):
            return dataclasses.asdict(x)
        if isinstance(x, (torch.dtype, torch.device)):
            return str(x)
        raise TypeError(f"not JSON serializable: {type(x).__name__}")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, **sections), f, indent=1, default=default)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

def _randn(g: torch.Generator, dtype=DTYPE):
    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=dtype)
    return rand


def op_inputs(T: int, shape: Shape, config, *, B: int = 1, seed: int = 0, dtype=DTYPE,
              requires_grad: bool = True) -> dict:
    """Fresh random inputs of nsa_attention (OP_NAMES -> tensor): q [B, T, Hq, D], k_cmp / v_cmp [B, Tc, Hkv, D],
    the raw keys and values of the selected and window branches [B, T, Hkv, D], gates in (0, 1) [B, T, Hq, 3]."""
    rand = _randn(torch.Generator("cuda").manual_seed(seed), dtype)
    Hq, Hkv, D = shape
    Tc = config.num_cmp_tokens(T)
    x = dict(q=rand(B, T, Hq, D), k_cmp=rand(B, Tc, Hkv, D), v_cmp=rand(B, Tc, Hkv, D), k_slc=rand(B, T, Hkv, D),
             v_slc=rand(B, T, Hkv, D), k_swa=rand(B, T, Hkv, D), v_swa=rand(B, T, Hkv, D),
             gates=torch.sigmoid(rand(B, T, Hq, 3)))
    return {k: v.requires_grad_(requires_grad) for k, v in x.items()}


def op_args(x: dict) -> list:
    """op_inputs' tensors in nsa_attention's order (before the config)."""
    return [x[n] for n in OP_NAMES]


def decode_inputs(B: int, L: int, config, shape: Shape = SHAPES["P"], *, seed: int = 0,
                  head_major: bool = True, dtype=DTYPE) -> dict:
    """Fresh inputs of one decoding step: q [B, 1, Hq, D], gates, cache buffers [B, T, Hkv, D] holding L tokens a
    row (stored [B, Hkv, T, D] with head_major, as NSACache stores them, else token-major; the same values either
    way), seq_lens int32 [B] = L."""
    rand = _randn(torch.Generator("cuda").manual_seed(seed), dtype)
    Hq, Hkv, D = shape

    def cache(T):
        x = rand(B, T, Hkv, D)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if head_major else x

    Tc = config.num_cmp_tokens(L)
    x = dict(q=rand(B, 1, Hq, D), k_cmp=cache(Tc), v_cmp=cache(Tc),
             **{name: cache(L) for name in ("k_slc", "v_slc", "k_swa", "v_swa")},
             gates=torch.sigmoid(rand(B, 1, Hq, 3)))
    x["seq_lens"] = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return x


def decode_args(x: dict) -> list:
    """decode_inputs' tensors in nsa_decode_attention's order (before the config)."""
    return [x[n] for n in ("q", *CACHE_NAMES, "gates", "seq_lens")]


def make_model(name: str, attention: str, n_layer: int, fuse_decode_glue: bool = True):
    """LanguageModel MODELS[name] with `attention` ("nsa" or "full"), bfloat16 on the GPU, eval mode; NSA layers
    run their decoding glue fused (ops/triton/decode_glue.py) or, with fuse_decode_glue=False, in torch."""
    import nsa
    cfg = nsa.ModelConfig(n_layer=n_layer, attention=attention, **MODELS[name])
    model = nsa.LanguageModel(cfg).to("cuda", DTYPE).eval()
    for block in model.blocks:
        if attention == "nsa":
            block.attn.fuse_decode_glue = fuse_decode_glue
    return model


def decode_step(x: dict, config, options=None) -> Callable:
    """The Triton decoding step on decode_inputs' x (kernel_options=options), as a callable of no arguments."""
    import nsa
    args = decode_args(x)
    return lambda: nsa.nsa_decode_attention(*args, config, backend="triton", kernel_options=options)


# ----------------------------------------------------------------------------------------------------------------
# Guarding, timing, memory, profiling
# ----------------------------------------------------------------------------------------------------------------

def reason(e: BaseException) -> str:
    """A one-line reason for an n/a cell."""
    text = str(e).strip().splitlines()
    name = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
    return f"{name}: {text[0][:160]}" if text else name


def guarded(fn: Callable, *args, **kwargs):
    """(fn(*args, **kwargs), None), or (None, reason) when it raises: the caller prints 'n/a (reason)' and the run
    goes on. Frees the CUDA cache after a failure (an OOM leaves the allocator's blocks cached)."""
    try:
        return fn(*args, **kwargs), None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # OOM, missing package, a kernel that does not compile, an unsupported shape
        why = reason(e)
    # Out of the except block: the traceback, and the tensors its frames held, are gone before the cache is freed.
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return None, why


def do_bench_ms(fn: Callable, warmup: int = 25, rep: int = 100) -> float:
    """Median ms of fn over `rep` ms of calls after `warmup` ms of warm-up (triton.testing.do_bench, which
    flushes the L2 before each call)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def event_ms(fn: Callable, iters: int = 10, warmup: int = 2) -> float:
    """Median ms of fn timed by CUDA events around each call, after `warmup` untimed calls. For long calls
    (a whole training step) where do_bench's time-based repetition count would be tiny anyway."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rotating(fns: list[Callable]) -> Callable:
    """One callable that calls fns in turn: each call reads a different input set, so none is served from the L2
    of the previous call (give it enough sets to exceed the L2: H100/H200 have 50 / 60 MB)."""
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


def peak_mib(fn: Callable) -> float:
    """Peak CUDA memory allocated during one call of fn, above what was allocated before it, MiB (run fn once
    first so that compilation and autotuning buffers are not counted)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(fn: Callable, warmup: int = 25, rep: int = 100, *, timer: str = "do_bench", iters: int = 10) -> dict:
    """{ms, peak_mib, error} of fn: one call to compile / autotune, one for the peak memory, then the median time
    (timer "do_bench" or "events"). On any failure ms and peak_mib are None and error says why."""
    def run():
        fn()
        torch.cuda.synchronize()
        peak = peak_mib(fn)
        ms = do_bench_ms(fn, warmup, rep) if timer == "do_bench" else event_ms(fn, iters)
        return dict(ms=ms, peak_mib=peak, error=None)
    rec, err = guarded(run)
    return rec if err is None else dict(ms=None, peak_mib=None, error=err)


def graphed(fn: Callable) -> tuple[Callable, bool]:
    """fn replayed from a CUDA graph, or fn itself when capture fails: (callable, captured?)."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, True
    except RuntimeError:
        torch.cuda.synchronize()
        return fn, False


def kernel_profile(fn: Callable, iters: int) -> dict:
    """{kernel name: (launches, device microseconds) per call, means} of fn's CUDA kernels (torch.profiler), after
    one untimed call."""
    import collections

    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    launches, times = collections.defaultdict(float), collections.defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            launches[e.name] += 1 / iters
            times[e.name] += e.device_time / iters
    return {name: (launches[name], times[name]) for name in times}


def kernel_times(fn: Callable, iters: int) -> dict:
    """{kernel name: mean device microseconds per call} of fn's CUDA kernels (kernel_profile)."""
    return {name: us for name, (_, us) in kernel_profile(fn, iters).items()}


def kernel_sum(times: dict, name: str) -> float:
    """Sum of kernel_times' entries whose name contains `name` (a kernel's launches under all its
    specializations)."""
    return sum(v for k, v in times.items() if name in k)


# ----------------------------------------------------------------------------------------------------------------
# Printing
# ----------------------------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f", error: str | None = None) -> str:
    """A table cell: the value, 'n/a (error)' when it failed, '-' when not measured."""
    if value is None:
        return f"n/a ({error})" if error else "-"
    return format(value, spec)


def ratio(num, den, spec: str = ".2f") -> str:
    """num / den as '1.23x', '-' when either is missing."""
    return "-" if num is None or den is None or den == 0 else f"{num / den:{spec}}x"


def table(headers: list[str], rows: list[list]) -> str:
    """A markdown table (cells already strings, or anything str() shows)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
