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
Part 2, end to end: LanguageModel.generate (greedy, KV cache, bfloat16 weights) of the models --models
(common.MODELS: the small demo model, width 512, 8 / 2 heads of 64; the wide one, width 2048, 16 / 1 heads of
128; --layers layers each), NSA (its decoding glue fused, and with --glue torch also the torch glue) and full
attention, after prompts of each of --prompts tokens, each batch size of --e2e-B: prefill seconds (the prompt's
forward, reported apart) and decoding tokens/s over the steady steps (after the prefill, the eager step and the
capture: tokens 4 .. --new-tokens), the steps replayed from a CUDA graph (generate's default on a GPU) and, with
--step-modes eager, eager.
Prints markdown tables (after a header naming the date, GPU and versions); writes results.json to --out.

    python benchmarks/bench_decode.py --L 8192 16384 32768 65536 131072 --B 1 32 --out bench_out
    python benchmarks/bench_decode.py --L --prompts 8192 32768 65536 --e2e-B 1 32 --glue fused torch
"""
from __future__ import annotations

import time

import torch

import common
import nsa
from common import decode_args, decode_inputs, decode_step, fmt
from nsa import NSAConfig

SHAPE = common.SHAPES["P"]


def bytes_read(B, L, config):
    """Cache bytes one decoding step must read: (NSA, SDPA)."""
    per_token = B * SHAPE.Hkv * 2 * SHAPE.D * 2  # K and V of every KV head of every row, bf16
    nsa_tokens = config.num_cmp_tokens(L) + min(config.num_selected * config.slc_block, L) + min(config.window, L)
    return per_token * nsa_tokens, per_token * L


def bench(fn, warmup, rep):
    """{ms (median), graph, error} of fn replayed from a CUDA graph (eager when capture fails); ms None with the
    error when fn cannot run."""
    def run():
        replay, captured = common.graphed(fn)
        return dict(ms=common.do_bench_ms(replay, warmup, rep), graph=captured, error=None)
    rec, err = common.guarded(run)
    return rec if err is None else dict(ms=None, graph=None, error=err)


def copy_bandwidth(gib=1.0):
    """GB/s of a device-to-device copy of `gib` GiB (bytes read + bytes written over time): the HBM yardstick."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = common.do_bench_ms(lambda: dst.copy_(src), 25, 100)
    return 2 * src.numel() / ms / 1e6


def check_correctness(config, L=8192):
    """The Triton step against the float32 reference on two rows of L tokens."""
    x = decode_inputs(2, L, config, SHAPE, seed=1)
    o = decode_step(x, config)()
    x32 = {k: v.float() if v.is_floating_point() else v for k, v in x.items()}
    ref = nsa.nsa_decode_attention(*decode_args(x32), config, backend="reference")
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

    x = decode_inputs(B, L, config, SHAPE)
    fns = {"nsa": decode_step(x, config), "sdpa_flash": sdpa_fn(x, SDPBackend.FLASH_ATTENTION),
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
            layers = [decode_inputs(B, L, config, SHAPE, seed=i) for i in range(graph_layers)]
            for name, make in (("nsa", lambda x: decode_step(x, config)),
                               ("sdpa_cudnn", lambda x: sdpa_fn(x, SDPBackend.CUDNN_ATTENTION))):
                steps = [make(x) for x in layers]
                rec = bench(lambda: [step() for step in steps], warmup, rep)
                out["per_layer"][name] = None if rec["ms"] is None else rec["ms"] / graph_layers
    return out


def graph_floor(warmup, rep):
    """ms of replaying a graph of one tiny kernel, timed like the steps: what the timing itself costs."""
    z = torch.zeros(1, device="cuda")
    return bench(z.zero_, warmup, rep)["ms"]


def run_generate(model_name, attention, glue, B, prompt_len, args, cuda_graph):
    """Prefill seconds and steady decoding tokens/s of generate() (see the module docstring)."""
    model = common.make_model(model_name, attention, args.layers, fuse_decode_glue=glue == "fused")
    prompt = torch.randint(0, model.cfg.vocab_size, (B, prompt_len), device="cuda")
    stamps = []

    def stamp(_tokens):
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    model.generate(prompt, args.new_tokens, temperature=0, cuda_graph=cuda_graph)  # warm up: compile every kernel
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(prompt, args.new_tokens, temperature=0, callback=stamp, cuda_graph=cuda_graph)
    steady = stamps[STEADY:]  # from the token after the capture (generate captures at its third token)
    out = dict(model=model_name, attention=attention, glue=glue if attention == "nsa" else None,
               cuda_graph=cuda_graph, B=B, prompt=prompt_len, new_tokens=args.new_tokens,
               prefill_s=stamps[0] - start, decode_tok_s=B * (len(steady) - 1) / (steady[-1] - steady[0]),
               params=model.num_params())
    del model
    torch.cuda.empty_cache()
    return out


STEADY = 3  # tokens before the steady steps: the prefill's, the eager step's and the capturing step's


def generate_runs(args):
    """(model, attention, glue) of every end-to-end run: NSA with each --glue, then full attention."""
    return [(m, "nsa", g) for m in args.models for g in args.glue] + [(m, "full", None) for m in args.models]


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
        print_generate(e2e)


def print_generate(e2e):
    """The end-to-end table: one line per (model, steps, B, prompt), NSA's runs beside full attention's."""
    full = {(r["model"], r["cuda_graph"], r["B"], r["prompt"]): r.get("decode_tok_s")
            for r in e2e if r["attention"] == "full"}
    rows = []
    for r in e2e:
        err = r.get("error")
        name = r["attention"] if r["attention"] == "full" else f"nsa ({r['glue']} glue)"
        vs_full = full.get((r["model"], r["cuda_graph"], r["B"], r["prompt"]))
        rows.append([r["model"], name, "CUDA graph" if r["cuda_graph"] else "eager", r["B"], r["prompt"],
                     fmt(r.get("prefill_s"), ".2f", err), fmt(r.get("decode_tok_s"), ".0f", err),
                     common.ratio(r.get("decode_tok_s"), vs_full)])
    print("\nEnd to end, generate() (prefill apart; decoding tokens/s over the steady steps, all rows):\n")
    print(common.table(["model", "attention", "steps", "B", "prompt", "prefill s", "decode tokens/s", "vs full"],
                       rows))


def main():
    parser = common.parser(__doc__)
    parser.add_argument("--L", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072],
                        help="context lengths (tokens held by each row); none skips part 1")
    parser.add_argument("--B", type=int, nargs="+", default=[1, 32], help="batch sizes")
    parser.add_argument("--prompts", type=int, nargs="*", default=[8192, 32768, 65536],
                        help="end to end: prompt lengths (none, or 0, skips part 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="end to end: tokens generated")
    parser.add_argument("--e2e-B", type=int, nargs="+", default=[1, 32], help="end to end: batch sizes")
    parser.add_argument("--models", nargs="+", default=sorted(common.MODELS), choices=sorted(common.MODELS),
                        help="end to end: models (common.MODELS)")
    parser.add_argument("--layers", type=int, default=4, help="end to end models: layers")
    parser.add_argument("--glue", nargs="+", default=["fused"], choices=["fused", "torch"],
                        help="end to end: NSA's decoding glue (fused Triton kernels, or the torch reference path)")
    parser.add_argument("--step-modes", nargs="+", default=["graph"], choices=["graph", "eager"],
                        help="end to end: decoding steps replayed from a CUDA graph, or eager")
    parser.add_argument("--graph-layers", type=int, default=8,
                        help="also time steps inside one graph of this many layers, where they fit (0: skip)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args()
    common.require_cuda("bench_decode.py")
    env = common.environment()
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
    if args.new_tokens < STEADY + 2:
        raise SystemExit(f"--new-tokens must be at least {STEADY + 2} (two steady steps to time)")
    for prompt in (p for p in args.prompts if p):
        for B in args.e2e_B:
            for model_name, kind, glue in generate_runs(args):  # kind: the model's attention, "nsa" or "full"
                for cuda_graph in (mode == "graph" for mode in args.step_modes):
                    print(f"generate {model_name} {kind} glue={glue} B={B} prompt={prompt} "
                          f"cuda_graph={cuda_graph} ...", flush=True)
                    rec, err = common.guarded(run_generate, model_name, kind, glue, B, prompt, args, cuda_graph)
                    e2e.append(rec or dict(model=model_name, attention=kind, glue=glue, cuda_graph=cuda_graph,
                                           B=B, prompt=prompt, error=err))
    common.print_header("decoding step", env)
    print_tables(attention, e2e, hbm, floor, args.graph_layers)
    meta = dict(env, copy_gb_s=hbm, graph_floor_ms=floor, config=config,
                shape=dict(SHAPE._asdict(), dtype="bfloat16"), args=vars(args))
    path = common.write_json(args.out, meta, attention=attention, generate=e2e)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
