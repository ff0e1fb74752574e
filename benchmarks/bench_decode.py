"""Decoding benchmark, CUDA only: one NSA decoding step through the KV cache beside SDPA over a full cache.

Part 1, attention only (Hq = 64, Hkv = 4, Dk = Dv = 128, bfloat16, default NSAConfig; every batch row holds
L tokens and decodes one new query): nsa_decode_attention(backend="triton") and torch SDPA (flash and cuDNN
backends, enable_gqa) of one query over the whole cache, each replayed as a CUDA graph (eager launches
when capture fails), timed with triton.testing.do_bench (median, L2 flushed between runs). Bytes each must
read from the cache, K and V of every KV head of every row (2 bytes an element):
    NSA:  B * Hkv * (Dk + Dv) * 2 * (Tc(L) + n*l' + w)   compressed tokens, n selected blocks, the window
    SDPA: B * Hkv * (Dk + Dv) * 2 * L                     the whole cache
and the achieved bandwidth, bytes / time. Also: the timing floor (a one-kernel graph timed the same way), and
the per-layer time of NSA and cuDNN steps replayed inside one graph of --graph-layers layers, each with its own
cache (a model's decoding step), where those caches fit in memory.
Part 2, end to end: LanguageModel.generate (greedy, KV cache, bfloat16 weights) of a small model, NSA and
full attention, after a prompt of --prompt tokens: prefill time and decoding tokens/s (batch --e2e-B), the
decoding steps replayed from a CUDA graph (generate's default on a GPU) and eager.
Prints markdown tables; writes results.json to --out.

    python benchmarks/bench_decode.py --L 8192 16384 32768 65536 131072 --B 1 32 --out bench_out
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

import nsa
from nsa import NSAConfig

HQ, HKV, D = 64, 4, 128
CACHE = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa")


def make_step(B, L, config, seed=0, head_major=True):
    """A decoding step's inputs: q [B, 1, Hq, D], gates, cache buffers [B, T, Hkv, D] holding L tokens per row
    (stored [B, Hkv, T, D] with head_major, as NSACache stores them, else token-major; the same values either
    way), seq_lens."""
    g = torch.Generator("cuda").manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    def cache(T):
        x = rand(B, T, HKV, D)
        return x.transpose(1, 2).contiguous().transpose(1, 2) if head_major else x

    Tc = config.num_cmp_tokens(L)
    x = dict(q=rand(B, 1, HQ, D), k_cmp=cache(Tc), v_cmp=cache(Tc),
             **{name: cache(L) for name in ("k_slc", "v_slc", "k_swa", "v_swa")},
             gates=torch.sigmoid(rand(B, 1, HQ, 3)))
    x["seq_lens"] = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return x


def step_args(x):
    """make_step's inputs in nsa_decode_attention's order (before the config)."""
    return [x[n] for n in ("q", *CACHE, "gates", "seq_lens")]


def nsa_step(x, config):
    """The Triton decoding step on make_step's inputs x, as a callable of no arguments."""
    args = step_args(x)
    return lambda: nsa.nsa_decode_attention(*args, config, backend="triton")


def bytes_read(B, L, config):
    """Cache bytes one decoding step must read: (NSA, SDPA)."""
    per_token = B * HKV * 2 * D * 2  # K and V of every KV head of every row, bf16
    nsa_tokens = config.num_cmp_tokens(L) + min(config.num_selected * config.slc_block, L) + min(config.window, L)
    return per_token * nsa_tokens, per_token * L


def graphed(fn):
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


def bench(fn, warmup, rep):
    """{ms (median), graph, error}; ms None with the error when fn cannot run."""
    import triton.testing
    try:
        run, captured = graphed(fn)
        return dict(ms=triton.testing.do_bench(run, warmup=warmup, rep=rep, return_mode="median"),
                    graph=captured, error=None)
    except (torch.cuda.OutOfMemoryError, RuntimeError, ValueError) as e:
        torch.cuda.empty_cache()
        return dict(ms=None, graph=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


def copy_bandwidth(gib=1.0):
    """GB/s of a device-to-device copy of `gib` GiB (bytes read + bytes written over time): the HBM yardstick."""
    import triton.testing
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() / ms / 1e6


def check_correctness(config, L=8192):
    """The Triton step against the float32 reference on two rows of L tokens."""
    x = make_step(2, L, config, seed=1)
    o = nsa_step(x, config)()
    x32 = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    ref = nsa.nsa_decode_attention(*step_args(x32), config, backend="reference")
    err = ((o.float() - ref).norm() / ref.norm()).item()
    print(f"check L={L}: relative error of the Triton step vs the float32 reference {err:.2e}")
    if err > 2e-2:
        raise SystemExit(f"correctness check failed: relative error {err:.3g}")


def run_attention(B, L, config, warmup, rep, graph_layers):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    def sdpa_fn(x, backend):
        q = x["q"].transpose(1, 2)  # [B, Hq, 1, D]
        k, v = x["k_swa"].transpose(1, 2), x["v_swa"].transpose(1, 2)  # the full cache [B, Hkv, L, D]

        def fn():
            with sdpa_kernel(backend):
                return sdpa(q, k, v, enable_gqa=True)  # the newest query sees every cached token
        return fn

    x = make_step(B, L, config)
    fns = {"nsa": nsa_step(x, config), "sdpa_flash": sdpa_fn(x, SDPBackend.FLASH_ATTENTION),
           "sdpa_cudnn": sdpa_fn(x, SDPBackend.CUDNN_ATTENTION)}
    nsa_bytes, full_bytes = bytes_read(B, L, config)
    out = {"B": B, "L": L, "kernels": {}, "per_layer": {}}
    with torch.no_grad():
        for name, fn in fns.items():
            rec = bench(fn, warmup, rep)
            rec["bytes"] = nsa_bytes if name == "nsa" else full_bytes
            rec["gb_s"] = None if rec["ms"] is None else rec["bytes"] / rec["ms"] / 1e6
            out["kernels"][name] = rec
        del x, fns
        # A model's decoding step replays one graph over all its layers: per-layer time there, each layer with
        # its own cache (so they do not share the L2), where graph_layers caches fit in memory.
        if graph_layers and B * L * graph_layers <= 6 * 2**20:
            layers = [make_step(B, L, config, seed=i) for i in range(graph_layers)]
            for name, make in (("nsa", lambda x: nsa_step(x, config)),
                               ("sdpa_cudnn", lambda x: sdpa_fn(x, SDPBackend.CUDNN_ATTENTION))):
                steps = [make(x) for x in layers]
                rec = bench(lambda: [step() for step in steps], warmup, rep)
                out["per_layer"][name] = None if rec["ms"] is None else rec["ms"] / graph_layers
    return out


def graph_floor(warmup, rep):
    """ms of replaying a graph of one tiny kernel, timed like the steps: what the timing itself costs."""
    z = torch.zeros(1, device="cuda")
    return bench(z.zero_, warmup, rep)["ms"]


def run_generate(attention, B, prompt_len, new_tokens, args, cuda_graph):
    """Prefill seconds and decoding tokens/s of generate() for a small model, its steps eager or replayed from a
    CUDA graph."""
    cfg = nsa.ModelConfig(n_layer=args.layers, n_embd=args.dim, n_head=args.heads, n_kv_head=args.kv_heads,
                          attention=attention)
    model = nsa.LanguageModel(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (B, prompt_len), device="cuda")
    stamps = []

    def stamp(_tokens):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model.generate(prompt, new_tokens, temperature=0, cuda_graph=cuda_graph)  # warm up: compile every kernel
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, callback=stamp, cuda_graph=cuda_graph)
    decode_s = stamps[-1] - stamps[0]  # new_tokens - 1 decoding steps
    out = dict(attention=attention, cuda_graph=cuda_graph, B=B, prompt=prompt_len, new_tokens=new_tokens,
               prefill_s=stamps[0] - start, decode_tok_s=B * (new_tokens - 1) / decode_s,
               params=model.num_params())
    del model
    torch.cuda.empty_cache()
    return out


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def print_tables(attention, e2e, hbm, floor, graph_layers):
    print("\n| B | L | NSA ms | flash ms | cuDNN ms | vs flash | vs cuDNN | NSA MB read | SDPA MB read "
          "| NSA GB/s | NSA % of copy | flash GB/s | cuDNN GB/s | graphs (nsa, flash, cuDNN) |")
    print("|" + "---|" * 14)
    for r in attention:
        k = r["kernels"]
        ms = [k[n]["ms"] for n in ("nsa", "sdpa_flash", "sdpa_cudnn")]
        speed = [None if ms[0] is None or m is None else m / ms[0] for m in ms[1:]]
        print(f"| {r['B']} | {r['L']} | " + " | ".join(fmt(m, ".3f") for m in ms) + " | "
              + " | ".join(fmt(s, ".1f") + ("x" if s else "") for s in speed) + " | "
              + f"{k['nsa']['bytes'] / 1e6:.1f} | {k['sdpa_flash']['bytes'] / 1e6:.1f} | "
              + fmt(k["nsa"]["gb_s"], ".0f") + " | "
              + fmt(None if k["nsa"]["gb_s"] is None else 100 * k["nsa"]["gb_s"] / hbm, ".0f") + " | "
              + " | ".join(fmt(k[n]["gb_s"], ".0f") for n in ("sdpa_flash", "sdpa_cudnn")) + " | "
              + ", ".join(str(k[n]["graph"]) for n in ("nsa", "sdpa_flash", "sdpa_cudnn")) + " |")
    print(f"\nTiming floor (a one-kernel graph replayed the same way): {floor * 1e3:.1f} us.")
    print(f"\nPer layer inside one graph of {graph_layers} layers (own caches):\n")
    print("| B | L | NSA us | cuDNN us | vs cuDNN |")
    print("|---|---|---|---|---|")
    for r in attention:
        p = r["per_layer"]
        if p:
            ratio = None if None in (p["nsa"], p["sdpa_cudnn"]) else p["sdpa_cudnn"] / p["nsa"]
            print(f"| {r['B']} | {r['L']} | {fmt(p['nsa'] and p['nsa'] * 1e3, '.1f')} | "
                  f"{fmt(p['sdpa_cudnn'] and p['sdpa_cudnn'] * 1e3, '.1f')} | {fmt(ratio, '.1f')}x |")
    for r in attention:
        for name, rec in r["kernels"].items():
            if rec["error"]:
                print(f"  B={r['B']} L={r['L']} {name}: {rec['error']}")
    if e2e:
        print("\n| attention | steps | B | prompt | prefill s | decode tokens/s |")
        print("|---|---|---|---|---|---|")
        for r in e2e:
            steps = "CUDA graph" if r["cuda_graph"] else "eager"
            print(f"| {r['attention']} | {steps} | {r['B']} | {r['prompt']} | {r['prefill_s']:.2f} | "
                  f"{r['decode_tok_s']:.0f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--L", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072],
                        help="context lengths (tokens held by each row)")
    parser.add_argument("--B", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--prompt", type=int, default=32768, help="end to end: prompt tokens (0 skips part 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="end to end: tokens generated")
    parser.add_argument("--e2e-B", type=int, default=1, help="end to end: batch size")
    parser.add_argument("--layers", type=int, default=4, help="end to end model: layers")
    parser.add_argument("--dim", type=int, default=512, help="end to end model: width")
    parser.add_argument("--heads", type=int, default=8, help="end to end model: query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="end to end model: key/value heads")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench repetitions, ms")
    parser.add_argument("--graph-layers", type=int, default=8,
                        help="also time steps inside one graph of this many layers, where they fit (0: skip)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA device")
    config = NSAConfig()
    if not args.no_check:
        check_correctness(config)
    hbm, floor = copy_bandwidth(), graph_floor(args.warmup, args.rep)
    print(f"device copy bandwidth (read + write): {hbm:.0f} GB/s; timing floor {floor * 1e3:.1f} us")
    attention = []
    for B in args.B:
        for L in args.L:
            print(f"attention B={B} L={L} ...", flush=True)
            attention.append(run_attention(B, L, config, args.warmup, args.rep, args.graph_layers))
            torch.cuda.empty_cache()  # the step's cache buffers are gone with run_attention's frame
    e2e = []
    if args.prompt:
        for name in ("nsa", "full"):
            for cuda_graph in (True, False):
                print(f"generate {name} prompt={args.prompt} cuda_graph={cuda_graph} ...", flush=True)
                e2e.append(run_generate(name, args.e2e_B, args.prompt, args.new_tokens, args, cuda_graph))
    print_tables(attention, e2e, hbm, floor, args.graph_layers)
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_gb_s=hbm, graph_floor_ms=floor,
                config=dataclasses.asdict(config),
                shape=dict(Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16"), args=vars(args))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(dict(meta=meta, attention=attention, generate=e2e), f, indent=1)
    print(f"wrote {args.out}/results.json")


if __name__ == "__main__":
    main()
