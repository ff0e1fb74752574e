"""Decode-step diagnosis on the GPU: the Triton step's selection and each branch alone against the reference.

For rows of several lengths (bench_decode's shape: Hq 64, Hkv 4, D 128, random bfloat16 inputs), prints
how many (row, group) selections equal the float64 reference's, each branch's relative error (gates one-hot),
and whether two calls give bitwise equal outputs.

    PYTHONPATH=src python benchmarks/diagnose_decode.py
"""
import torch

import nsa
from nsa.ops import reference
from nsa.ops.triton import decode

HQ, HKV, D = 64, 4, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU: TRITON_INTERPRET=1
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter's bf16 tl.dot is wrong


def reference_ids(q, k_cmp, L, config, scale):
    """Block ids of the newest query of each group, float64: [Hkv, n]."""
    G = HQ // HKV
    qh = q[0, 0].double().view(HKV, G, 1, D)[None]  # [1, Hkv, G, 1, D]
    kc = k_cmp[0, :config.num_cmp_tokens(L)].double().transpose(0, 1)[None]  # [1, Hkv, Tc, D]
    t = torch.tensor([L - 1], device=q.device)
    p, _ = reference._cmp_attention(qh, kc, None, t, config, scale)
    return reference._select(p, t, L, config)[0, :, 0]


LENGTHS = ((8192, 8192), (8192, 9000), (5000, 8192), (975 + 20, 2048), (64, 128), (4096, 4096))


def main():
    config = nsa.NSAConfig()
    scale = D ** -0.5
    torch.manual_seed(0)
    print("| L | capacity | selections equal | cmp err | slc err | swa err | all err | deterministic |")
    print("|---|---|---|---|---|---|---|---|")
    for L, cap in LENGTHS:
        Tc_cap = config.num_cmp_tokens(cap)
        rand = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE)  # noqa: E731
        q, kc, vc = rand(1, 1, HQ, D), rand(1, Tc_cap, HKV, D), rand(1, Tc_cap, HKV, D)
        raw = [rand(1, cap, HKV, D) for _ in range(4)]
        lens = torch.tensor([L], dtype=torch.int32, device=DEVICE)
        args = (q, kc, vc, *raw)
        ids_ref = reference_ids(q, kc, L, config, scale)
        errs = []
        with torch.no_grad():
            for gate in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [0.3, 0.5, 0.7]):
                gates = torch.tensor(gate, device=DEVICE, dtype=DTYPE).expand(1, 1, HQ, 3).contiguous()
                o, ids = decode.nsa_decode_attention(*args, gates, lens, config, scale, return_block_ids=True)
                o2 = decode.nsa_decode_attention(*args, gates, lens, config, scale)
                ref = nsa.nsa_decode_attention(*(x.double() for x in args), gates.double(), lens, config,
                                               backend="reference")
                errs.append(((o.double() - ref).norm() / ref.norm()).item())
        same = (ids[0, 0] == ids_ref).all(-1)
        print(f"| {L} | {cap} | {int(same.sum())}/{HKV} | " + " | ".join(f"{e:.1e}" for e in errs)
              + f" | {torch.equal(o, o2)} |")
        if not same.all():
            for g in range(HKV):
                print(f"   group {g}: triton {ids[0, 0, g].tolist()}\n            ref    {ids_ref[g].tolist()}")


if __name__ == "__main__":
    main()
