"""How much the selected blocks of neighbouring queries overlap in a trained NSA model, against random inputs: the
number that decides whether the selected branch's kernels should walk the union of several queries' blocks.

    python benchmarks/selection_overlap.py RUN_OR_CHECKPOINT [--length 8192] [--windows 4] [--tiles 2 4 8 16] [--time]

A selected-branch program that serves one query (its G heads, n blocks: the paper's kernel, and this library's
choice at G >= 16 until 2026-12-03) is bound by L2 traffic at 8k: every block is loaded once per query. A program
that serves k consecutive queries loads each block of their union once. "load share" = block loads of k-query
tiles / block loads of one-query tiles: 1 / k when neighbours select the same blocks, 1 when they share none. BENCHMARKS.md (2026-12-02, evening) measured k-query
tiles slower on random inputs, whose neighbouring selections are unrelated; this script says what a trained model's
are. Per NSA layer, on --windows validation windows of --length bytes (the run's training length by default), over the
queries past the first n blocks (before them every candidate block is selected); the "random" row selects from
random q and compressed keys of the layer's shapes. Runs on the CPU or a GPU.

--time (CUDA): the selected branch's kernels on these selections, at shapes P and S of the op benchmarks (random
bf16 q, k, v of length --length; block ids of windows 0, 1, ... laid side by side as the shape's KV heads), under
query tiles of several sizes (KernelOptions.selected_fwd / selected_dq block_m): device ms per call of the union,
forward, dq and kv-major kernels (CUDA profiler), each layer's trained selections against random ones.
"""
from __future__ import annotations

import torch

import common
import nsa
from nsa import KernelOptions, Launch
from nsa.checkpoint import load_model
from nsa.data import get_batch, load_corpus
from nsa.eval import layer_selections


def load_share(ids: torch.Tensor, tile: int, first_query: int) -> float:
    """Block loads of tiles of `tile` consecutive queries (each block of the tile's union once) over the loads of one
    query at a time, for block ids long [B, T, Hkv, n] (-1 unused), queries from first_query (rounded up to a tile)."""
    start = -(-first_query // tile) * tile
    T = ids.shape[1]
    usable = (T - start) // tile * tile
    if usable <= 0:
        raise ValueError(f"no whole tile of {tile} queries past query {first_query} in {T}")
    x = ids[:, start:start + usable]
    B, _, Hkv, n = x.shape
    x = x.reshape(B, usable // tile, tile, Hkv, n).permute(0, 1, 3, 2, 4).reshape(B, usable // tile, Hkv, tile * n)
    x = x.sort(-1).values
    valid = x >= 0
    distinct = valid[..., :1].sum() + (valid[..., 1:] & (x[..., 1:] != x[..., :-1])).sum()
    return distinct.item() / valid.sum().item()


def random_ids(q_shape, k_cmp_shape, config, seed: int = 0) -> torch.Tensor:
    """nsa.select_blocks on random q [B, T, Hq, Dk] and compressed keys [B, Tc, Hkv, Dk] (float32, the reference on
    the CPU), as the kernel benchmarks do."""
    g = torch.Generator().manual_seed(seed)
    q, k_cmp = torch.randn(*q_shape, generator=g), torch.randn(*k_cmp_shape, generator=g)
    return nsa.select_blocks(q, k_cmp, config).long()


# Query tiles timed by --time: (rows per program, forward warps, dq warps). The first is the library's choice (since
# 2026-12-03: 64-row tiles, and 16-row tiles for the 64-row tiles whose queries share few blocks); then 16-row tiles
# alone (the choice before), and 64-row tiles alone.
TILE_VARIANTS = [(None, None, None), (16, 1, 2), (64, 4, 4)]
KERNELS = ("_tile_union_kernel", "_selected_fwd_kernel", "_selected_dq_kernel", "_selected_dkdv_kernel")


def shape_ids(ids: torch.Tensor, hkv: int) -> torch.Tensor:
    """Block ids long [W, T, H, n] of W windows -> int32 [1, T, hkv, n]: the windows' heads side by side."""
    heads = ids.permute(1, 0, 2, 3).reshape(ids.shape[1], -1, ids.shape[3])
    if heads.shape[1] < hkv:
        raise SystemExit(f"--time needs {hkv} (window, KV head) pairs, the selections have {heads.shape[1]}: "
                         f"raise --windows")
    return heads[None, :, :hkv].to(torch.int32).contiguous()


def time_tiles(sources: dict, config, length: int, iters: int = 5) -> None:
    """Prints the selected kernels' device ms for each (shape, source of block ids, query tile)."""
    from nsa.ops.triton.selected_attention import selected_attention_bwd, selected_attention_fwd

    rows = []
    for shape_name, shape in common.SHAPES.items():
        x = common.op_inputs(length, shape, config, requires_grad=False)
        q, k, v = x["q"], x["k_slc"], x["v_slc"]
        do = torch.randn_like(q)
        scale = shape.D ** -0.5
        for source, ids in sources.items():
            ids = shape_ids(ids, shape.Hkv).to(q.device)
            for block_m, fwd_warps, dq_warps in TILE_VARIANTS:
                options = KernelOptions(selected_fwd=Launch(block_m=block_m, num_warps=fwd_warps),
                                        selected_dq=Launch(block_m=block_m, num_warps=dq_warps))

                def run():
                    o, lse = selected_attention_fwd(q, k, v, ids, scale, config.slc_block, options=options)
                    selected_attention_bwd(do, q, k, v, o, lse, ids, scale, config.slc_block, options=options)
                t, err = common.guarded(common.kernel_times, run, iters)
                ms = [None if t is None else common.kernel_sum(t, name) / 1e3 for name in KERNELS]
                total = None if t is None else sum(ms)
                tile = "library" if block_m is None else f"{block_m} rows, {fwd_warps}/{dq_warps} warps"
                rows.append([shape_name, source, tile] + [common.fmt(m, ".3f", err) for m in ms + [total]])
                print(f"  {shape_name} {source} {tile}: done", flush=True)
    print(f"\nSelected-branch kernels at T = {length}, device ms per call (fwd + bwd):\n")
    print(common.table(["shape", "block ids", "query tile", "union", "forward", "dq", "kv-major", "sum"], rows))


def main() -> None:
    p = common.parser(__doc__, out=None, timing=False)
    p.add_argument("run", help="an nsa train run folder or a checkpoint file")
    p.add_argument("--length", type=int, help="window length in bytes (default: the run's seq_len)")
    p.add_argument("--windows", type=int, default=4, help="validation windows")
    p.add_argument("--tiles", type=int, nargs="+", default=[2, 4, 8, 16], help="queries per tile")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--time", action="store_true", help="time the selected kernels on these selections (CUDA)")
    args = p.parse_args()
    model, config = load_model(args.run, args.device)
    train = config.get("train", {})
    length = args.length or train["seq_len"]
    corpus = load_corpus(train.get("data"), train.get("data_max_bytes", 4_000_000))
    x, _ = get_batch(corpus.val, args.windows, length, torch.Generator().manual_seed(0), device=args.device)
    layers = [block.attn for block in model.blocks if isinstance(block.attn, nsa.NativeSparseAttention)]
    if not layers:
        raise SystemExit(f"{args.run} has no NSA layer")
    common.print_header("overlap of neighbouring queries' selected blocks")
    print(f"\n{args.run}: {args.windows} validation windows of {length} bytes; load share of k-query tiles "
          f"(1 / k: neighbours select the same blocks; 1: they share none)\n")
    rows, sources = [], {}
    with torch.no_grad():
        for i, (cfg, ids, *_) in enumerate(layer_selections(model, x)):
            first = cfg.num_selected * cfg.slc_block
            rows.append([f"layer {i}"] + [f"{load_share(ids.cpu(), k, first):.3f}" for k in args.tiles])
            sources[f"layer {i}"] = ids
        layer = layers[0]
        q_shape = (args.windows, length, layer.num_heads, layer.head_dim)
        k_shape = (args.windows, layer.config.num_cmp_tokens(length), layer.num_kv_heads, layer.head_dim)
        ids = random_ids(q_shape, k_shape, layer.config)
        first = layer.config.num_selected * layer.config.slc_block
        rows.append(["random inputs"] + [f"{load_share(ids, k, first):.3f}" for k in args.tiles])
        sources["random"] = ids
    print(common.table(["selection"] + [f"{k} queries" for k in args.tiles], rows))
    print("\n(1 / k: " + ", ".join(f"{1 / k:.3f}" for k in args.tiles) + ")")
    if args.time:
        common.require_cuda("selection_overlap.py --time")
        time_tiles(sources, layers[0].config, length)


if __name__ == "__main__":
    main()
