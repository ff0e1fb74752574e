"""Where a training step's host time goes, CUDA only: the model step of bench_op.py (part "model"), NSA against full
attention, split into what the host spends issuing it and what the device spends running it.

Part 1, per model (attention "nsa" and "full", eager, bf16 autocast, B = 1, at each --T): median over --steps of
  wall ms     one forward + backward, synchronized before and after;
  host ms     the time until the step's Python returns (loss.backward() included), the device still running: the
              host's issue time. host >= wall means the device waits on the host (the step is host-bound);
  kernels     CUDA kernel launches per step and their device time (torch.profiler).
Part 2 (NSA): inclusive host time per step of the functions on the op's path (the layer's parts, the public entry,
the Triton backend's stages and its launches, counted with perf_counter wrappers), with calls per step. Nested
rows are included in their parents; "triton launches" is every JITFunction launch (argument binding, the cached
kernel lookup, the driver call).
Part 3 (NSA): torch.profiler's CPU operations by self time (--rows of them), over --steps steps.

    python benchmarks/profile_step.py --T 8192 32768 --steps 10
"""
from __future__ import annotations

import collections
import contextlib
import functools
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import common
from bench_op import model_config, training_step


def host_and_wall(step, steps: int) -> tuple[float, float]:
    """(median host issue ms, median wall ms) of step over `steps` calls, each started on an idle device."""
    host, wall = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(host), statistics.median(wall)


# The functions whose host time part 2 reports: (label, module path, attribute path). Patched where they are looked
# up at call time (a module imported by name is patched in the importing module).
TIMED = [
    ("model forward", "nsa.model", "LanguageModel.forward"),
    ("layer: projections + rope", "nsa.layer", "NativeSparseAttention._project"),
    ("layer: phi + rope", "nsa.layer", "NativeSparseAttention._compress"),
    ("layer: compression blocks", "nsa.layer", "NativeSparseAttention._cmp_blocks"),
    ("nsa_attention (checks + op)", "nsa.layer", "nsa_attention"),
    ("  input checks", "nsa.ops", "check_attention_inputs"),
    ("  triton forward", "nsa.ops.triton", "nsa_attention_fwd"),
    ("    compressed / window fwd", "nsa.ops.triton.op", "banded_attention_fwd"),
    ("    selection", "nsa.ops.triton.op", "select_blocks_fwd"),
    ("    selected fwd", "nsa.ops.triton.op", "selected_attention_fwd"),
    ("    gate combine", "nsa.ops.triton.op", "gate_combine"),
    ("  triton backward", "nsa.ops.triton", "nsa_attention_bwd"),
    ("    gate backward", "nsa.ops.triton.op", "gate_backward"),
    ("    gated do_c", "nsa.ops.triton.op", "gated_grad"),
    ("    compressed / window bwd", "nsa.ops.triton.op", "banded_attention_bwd"),
    ("    selected bwd", "nsa.ops.triton.op", "selected_attention_bwd"),
    ("      inverse index", "nsa.ops.triton.selected_attention", "_inverse_index"),
    ("        sort by key", "nsa.ops.triton.selected_attention", "_queries_by_key"),
    ("        work items", "nsa.ops.triton.selected_attention", "_work_items"),
    ("      tile unions", "nsa.ops.triton.selected_attention", "_tile_unions"),
    ("triton launches", "triton.runtime.jit", "JITFunction.run"),
]


@contextlib.contextmanager
def timed_functions():
    """Wraps every TIMED function with a perf_counter timer; yields {label: [calls, seconds]}."""
    import importlib
    totals = collections.defaultdict(lambda: [0, 0.0])
    restore = []
    for label, module_name, path in TIMED:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        original = getattr(owner, name)

        def make(fn, label):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    rec = totals[label]
                    rec[0] += 1
                    rec[1] += time.perf_counter() - t0
            return wrapper
        setattr(owner, name, make(original, label))
        restore.append((owner, name, original))
    try:
        yield totals
    finally:
        for owner, name, original in reversed(restore):
            setattr(owner, name, original)


def kernel_count(step, steps: int) -> tuple[float, float]:
    """(CUDA kernel launches per step, their device ms per step)."""
    prof = common.kernel_profile(step, steps)
    return sum(n for n, _ in prof.values()), sum(us for _, us in prof.values()) / 1e3


def main():
    parser = common.parser(__doc__, out=None, timing=False)
    parser.add_argument("--T", type=int, nargs="+", default=[8192])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--rows", type=int, default=25, help="part 3: CPU operations shown")
    args = parser.parse_args()
    common.require_cuda("profile_step.py")
    env = common.environment()
    summary, parts = [], []
    for T in args.T:
        for attention in ("nsa", "full"):
            step, model = training_step(attention, T)
            for _ in range(3):
                step()
            host, wall = host_and_wall(step, args.steps)
            launches, device_ms = kernel_count(step, args.steps)
            summary.append([T, attention, f"{wall:.2f}", f"{host:.2f}", f"{device_ms:.2f}", f"{launches:.0f}",
                            "host" if host >= 0.95 * wall else "device"])
            if attention == "nsa":
                with timed_functions() as totals:
                    for _ in range(args.steps):
                        step()
                    torch.cuda.synchronize()
                parts.append((T, {k: (n / args.steps, s * 1e3 / args.steps) for k, (n, s) in totals.items()}))
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        step()
                    torch.cuda.synchronize()
                print(f"\nNSA step, T = {T}: CPU operations by self time, totals over {args.steps} steps\n")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
            del step, model
            torch.cuda.empty_cache()

    common.print_header("host and device time of the model training step", env)
    cfg = model_config("nsa")
    print(f"\nModel: n_layer {cfg.n_layer}, n_embd {cfg.n_embd}, n_head {cfg.n_head}, n_kv_head {cfg.n_kv_head}, "
          f"head_dim {cfg.head_dim}, B = 1, bf16 autocast, forward + backward; medians of {args.steps} steps.\n")
    print(common.table(["T", "attention", "wall ms", "host ms", "kernel ms", "launches", "bound by"], summary))
    for T, rows in parts:
        print(f"\nNSA, T = {T}: inclusive host ms per step (nested rows are part of their parents)\n")
        print(common.table(["function", "calls / step", "host ms / step"],
                           [[label, f"{rows[label][0]:.0f}", f"{rows[label][1]:.2f}"]
                            for label, _, _ in TIMED if label in rows]))


if __name__ == "__main__":
    main()
