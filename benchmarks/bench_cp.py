"""Context parallelism on several GPUs (nsa.distributed, NCCL): the NSA op's forward+backward per world size.

Run under torchrun, once per world size W (each run also times one GPU alone for the efficiency):
    PYTHONPATH=src torchrun --nproc-per-node W benchmarks/bench_cp.py [--seq-lens 131072 262144 524288]
Shape P (Hq 64, Hkv 4, D 128), bfloat16, B = 1, default NSAConfig, backend "triton". For each T:
  cp ms      fwd+bwd of nsa.distributed.context_parallel_attention on the W ranks (the slowest rank's median over
             --iters calls, CUDA events): the K/V all-gather, the rank's two chunks as suffix queries, the gradient
             reduce-scatter;
  1-GPU ms   fwd+bwd of nsa.nsa_attention on the whole sequence, rank 0 alone (the others wait);
  efficiency 1-GPU ms / (W * cp ms): 1.0 is perfect scaling;
  peak GiB   the largest peak CUDA memory of a rank during one cp call (torch.cuda.max_memory_allocated).
Then T doubles from the last --seq-lens value until a call fails (out of memory, caught on every rank: all ranks
run the same symmetric work, so they fail together): the largest T that fits, with and without CP.
Correctness at --check-len (128k): every rank computes the whole-sequence op too and compares its shard of the
output and of the eight gradients with its CP results (max |difference| over all ranks, and the share of output
rows within 2e-2: bfloat16, and block selection may differ on near-ties).
The inputs of the timed calls are random per rank (a CP rank never needs the whole sequence's queries).
NCCL settings stay as the machine sets them (NVLink multicast off; no NCCL_* variable is set here).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import common
from nsa import NSAConfig, nsa_attention
from nsa.distributed import ContextParallelLayout, context_parallel_attention, shard, shard_compressed

COMPRESSED = ("k_cmp", "v_cmp")


def local_inputs(layout: ContextParallelLayout, shape: common.Shape, seed: int) -> dict:
    """Random shards of the op's inputs for this rank: [1, local_len or local_cmp_len, H, D]."""
    g = torch.Generator("cuda").manual_seed(seed)
    Hq, Hkv, D = shape

    def rand(*s):
        return torch.randn(*s, generator=g, device="cuda", dtype=common.DTYPE).requires_grad_()

    n, nc = layout.local_len, layout.local_cmp_len
    x = dict(q=rand(1, n, Hq, D), k_cmp=rand(1, nc, Hkv, D), v_cmp=rand(1, nc, Hkv, D), k_slc=rand(1, n, Hkv, D),
             v_slc=rand(1, n, Hkv, D), k_swa=rand(1, n, Hkv, D), v_swa=rand(1, n, Hkv, D))
    x["gates"] = torch.sigmoid(rand(1, n, Hq, 3)).detach().requires_grad_()
    return x


def fwd_bwd(fn, x: dict):
    """A callable running fn on x's tensors, forward and backward (gradients into the leaves, reset each call)."""
    def run():
        for v in x.values():
            v.grad = None
        o = fn(*(x[n] for n in common.OP_NAMES))
        o.backward(torch.ones_like(o))
    return run


def all_ranks_ok(error) -> bool:
    """Whether no rank failed (one all-reduce)."""
    flag = torch.tensor([0 if error is None else 1], device="cuda")
    dist.all_reduce(flag)
    return int(flag) == 0


def slowest(value: float) -> float:
    t = torch.tensor([value], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def measure_cp(T: int, config: NSAConfig, shape: common.Shape, iters: int) -> dict:
    layout = ContextParallelLayout(config, seq_len=T)
    W, rank = layout.world_size, layout.rank

    def run():
        x = local_inputs(layout, shape, seed=rank)
        step = fwd_bwd(lambda *a: context_parallel_attention(*a, layout), x)
        step()
        torch.cuda.synchronize()
        peak = common.peak_mib(step) / 1024
        return dict(ms=common.event_ms(step, iters, warmup=1), peak_gib=peak)
    rec, err = common.guarded(run)
    if not all_ranks_ok(err):
        return dict(ms=None, peak_gib=None, error=err or "another rank failed")
    return dict(ms=slowest(rec["ms"]), peak_gib=slowest(rec["peak_gib"]), error=None, world=W)


def measure_one_gpu(T: int, config: NSAConfig, shape: common.Shape, iters: int) -> dict:
    """Rank 0 alone times the whole-sequence op; every rank returns its result (a broadcast)."""
    rec, err = None, None
    if dist.get_rank() == 0:
        def run():
            x = common.op_inputs(T, shape, config)
            step = fwd_bwd(lambda *a: nsa_attention(*a, config), x)
            step()
            torch.cuda.synchronize()
            return common.event_ms(step, iters, warmup=1)
        rec, err = common.guarded(run)
    box = [dict(ms=rec, error=err)]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check(T: int, config: NSAConfig, shape: common.Shape) -> dict:
    """Max |CP - one GPU| over the output and the eight gradients, over all ranks, and the share of close rows."""
    layout = ContextParallelLayout(config, seq_len=T)
    x = common.op_inputs(T, shape, config, seed=123)  # the same whole inputs on every rank
    o = nsa_attention(*(x[n] for n in common.OP_NAMES), config)
    do = torch.randn(o.shape, generator=torch.Generator("cuda").manual_seed(7), device="cuda", dtype=o.dtype)
    grads = torch.autograd.grad(o, [x[n] for n in common.OP_NAMES], do)
    local = {n: (shard_compressed if n in COMPRESSED else shard)(v.detach(), layout).requires_grad_()
             for n, v in x.items()}
    o_cp = context_parallel_attention(*(local[n] for n in common.OP_NAMES), layout)
    grads_cp = torch.autograd.grad(o_cp, [local[n] for n in common.OP_NAMES], shard(do, layout))
    diffs = [(o_cp - shard(o, layout)).abs().max()]
    for n, g, g_ref in zip(common.OP_NAMES, grads_cp, grads):
        diffs.append((g - (shard_compressed if n in COMPRESSED else shard)(g_ref, layout)).abs().max())
    close = ((o_cp - shard(o, layout)).abs().amax(dim=(2, 3)) <= 2e-2).float().mean()
    stats = torch.stack([d.float() for d in diffs] + [-close])
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    names = ("o",) + tuple("d" + n for n in common.OP_NAMES)
    return dict(max_abs_diff=dict(zip(names, stats[:-1].tolist())), close_rows=-float(stats[-1]))


def main() -> None:
    p = common.parser(__doc__, timing=False)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 262144, 524288])
    p.add_argument("--max-seq-len", type=int, default=1 << 24, help="where the search for the largest T stops")
    p.add_argument("--check-len", type=int, default=131072, help="T of the correctness check (0: skip it)")
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    common.require_cuda("bench_cp.py")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    W, rank = dist.get_world_size(), dist.get_rank()
    config, shape = NSAConfig(), common.SHAPES["P"]
    env = common.print_header(f"context parallelism, {W} GPUs") if rank == 0 else None

    rows, records = [], []
    for T in args.seq_lens:
        cp = measure_cp(T, config, shape, args.iters)
        one = measure_one_gpu(T, config, shape, args.iters)
        eff = None if cp["ms"] is None or one["ms"] is None else one["ms"] / (W * cp["ms"])
        records.append(dict(T=T, world=W, cp=cp, one_gpu=one, efficiency=eff))
        rows.append([T, W, common.fmt(cp["ms"], ".1f", cp["error"]), common.fmt(one["ms"], ".1f", one["error"]),
                     common.fmt(eff, ".2f"), common.fmt(cp["peak_gib"], ".1f", cp["error"])])
        if rank == 0:
            print(common.table(["T", "GPUs", "cp ms", "1-GPU ms", "efficiency", "peak GiB/rank"], rows[-1:]),
                  flush=True)

    largest = {}
    for name, measure in (("cp", measure_cp), ("one_gpu", measure_one_gpu)):
        T, fits = args.seq_lens[-1], None
        while T <= args.max_seq_len:
            rec = measure(T, config, shape, 1)
            if rec["ms"] is None:
                break
            fits, T = T, 2 * T
        largest[name] = fits
    checked = check(args.check_len, config, shape) if args.check_len else None
    if rank == 0:
        print(common.table(["T", "GPUs", "cp ms", "1-GPU ms", "efficiency", "peak GiB/rank"], rows))
        print(f"\nlargest T (doubling from {args.seq_lens[-1]}): {largest['cp']} on {W} GPUs, "
              f"{largest['one_gpu']} on one")
        if checked:
            print(f"CP vs one GPU at T = {args.check_len}: max |diff| {checked['max_abs_diff']}, "
                  f"output rows within 2e-2: {checked['close_rows']:.4f}")
        path = common.write_json(args.out, env, name=f"cp_{W}gpu.json", runs=records, largest=largest,
                                 check=checked)
        print(f"\nwrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
