"""Memory-safety run for compute-sanitizer: the Triton decoding step and the training op at small sizes on CUDA.

Runs the decoding step's kernels (no host check, as inside a CUDA graph) with random lengths and with hostile
ones (past the capacity, 0, negative, below S, huge, a k_cmp too small or with no slot), the layer's fused decoding
glue (ops/triton/decode_glue.py) inside layer steps whose device length is hostile behind a valid host mirror, and
the training op's forward and backward with random packed lengths; checks the hostile rows are NaN and flagged.
Exits 0 when all is well; compute-sanitizer reports any access outside a buffer.

    compute-sanitizer --tool memcheck python benchmarks/memcheck_decode.py
"""
import argparse
import sys

import torch

import nsa
from nsa.ops.triton import decode

CONFIGS = (nsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4, window=24),
           nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=1, window=12))
HOSTILE = (lambda cap: cap + 1, lambda cap: 0, lambda cap: -5, lambda cap: 10 ** 6, lambda cap: 2 ** 31 - 1,
           lambda cap: -2 ** 31)


def rand(*shape, dtype=torch.float16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


def decode_step(config, B, S, G, Hkv, capacity, cmp_slots, lengths):
    """One decoding step over random buffers; returns (o [B, S, Hq, D], error flag)."""
    D = 32
    q, gates = rand(B, S, G * Hkv, D), torch.sigmoid(rand(B, S, G * Hkv, 3))
    cache = [rand(B, cmp_slots, Hkv, D) for _ in range(2)] + [rand(B, capacity, Hkv, D) for _ in range(4)]
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    o = decode.nsa_decode_attention(q, *cache, gates, lens, config, D ** -0.5, error_flag=flag)
    return o, flag


def check_decode(config, gen):
    B, S, G, Hkv, capacity = 3, 2, 4, 2, 200
    cmp_capacity = config.num_cmp_tokens(capacity)
    for _ in range(5):  # random valid lengths
        lengths = torch.randint(S, capacity + 1, (B,), generator=gen).tolist()
        o, flag = decode_step(config, B, S, G, Hkv, capacity, cmp_capacity, lengths)
        assert flag.item() == 0 and torch.isfinite(o).all(), lengths
    cases = [(cmp_capacity, hostile(capacity)) for hostile in HOSTILE] + [(cmp_capacity, S - 1)]
    cases += [(0, capacity), (0, config.cmp_block), (cmp_capacity // 2, capacity)]  # k_cmp too small for the row
    for cmp_slots, bad in cases:
        o, flag = decode_step(config, B, S, G, Hkv, capacity, cmp_slots, [capacity // 2, bad, S])
        assert flag.item() == 1 and o[1].isnan().all(), (cmp_slots, bad)


def check_glue(config, gen):
    """Layer steps of S = 1 and 5 tokens through the fused glue (share_kv off and on, Dk 32 != Dv 16), rows at random
    lengths, then row 1's device length hostile for the glue (past capacity - S, negative, huge): that row NaN and
    flagged, the others finite."""
    B, capacity = 3, 120
    for share_kv in (False, True):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        layer = nsa.NativeSparseAttention(64, 8, 2, 32, 16, config=config, share_kv=share_kv, backend="triton")
        layer = layer.to("cuda", torch.float16)
        for S in (1, 5):
            hostile = (capacity - S + 1, capacity + 1, -5, 10 ** 6, 2 ** 31 - 1, -2 ** 31)
            for bad in (None,) + hostile:
                cache = layer.new_cache(B, capacity)
                lengths = torch.randint(0, capacity - S + 1, (B,), generator=gen).tolist()
                cache.set_seqlens(lengths)
                cache.advance_host(0)
                if bad is not None:
                    cache.cache_seqlens[1] = bad
                with torch.no_grad():
                    y = layer.step(rand(B, S, 64), cache)
                flagged = cache.error_flag.item() == 1
                assert flagged == (bad is not None) and (y[1].isnan().all() if flagged else y.isfinite().all())
                assert torch.isfinite(y[[0, 2]]).all(), (share_kv, S, bad)


def check_training_op(config, gen):
    """Forward and backward of the training op: random packed lengths and dense batches of a length that is not a
    multiple of any query tile, at G = 4 and G = 16 (each with its wide and 16-row tiles of the selected walk)."""
    lengths = torch.randint(1, 150, (3,), generator=gen).tolist() + [config.cmp_block - 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    for B, T, Tc, H, Hkv, cu_seqlens in (
            (1, sum(lengths), sum(config.num_cmp_tokens(n) for n in lengths), 8, 2, cu),
            (2, 133, config.num_cmp_tokens(133), 8, 2, None),
            (2, 133, config.num_cmp_tokens(133), 16, 1, None)):
        D = 32
        x = [rand(B, T, H, D)] + [rand(B, Tc, Hkv, D) for _ in range(2)] + [rand(B, T, Hkv, D) for _ in range(4)]
        x.append(torch.sigmoid(rand(B, T, H, 3)))
        x = [t.requires_grad_() for t in x]
        o = nsa.nsa_attention(*x, config, cu_seqlens=cu_seqlens, backend="triton")
        o.float().square().sum().backward()
        assert torch.isfinite(o).all() and all(torch.isfinite(t.grad).all() for t in x)


def main() -> int:
    argparse.ArgumentParser(prog="memcheck_decode.py", description=__doc__.splitlines()[0]).parse_args()
    if not torch.cuda.is_available():
        print("memcheck_decode.py needs a CUDA device", file=sys.stderr)
        return 1
    gen = torch.Generator().manual_seed(0)
    for config in CONFIGS:
        check_decode(config, gen)
        check_glue(config, gen)
        check_training_op(config, gen)
    torch.cuda.synchronize()
    print("memcheck_decode: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
