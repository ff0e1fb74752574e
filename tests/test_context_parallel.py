"""Context parallelism (nsa.distributed): the layout's causal load balance, and the CP op's output and all eight
gradients against the single-process op on the whole batch, in 2 and 4 gloo processes spawned by the test
(reference backend in float64, Triton under the interpreter in float32; dense and packed, uneven lengths,
lengths that do not divide by 2W, sequences shorter than 2W). GPU-marked: a world of one on CUDA equals the
plain op.

Not bitwise: the query chunks start at other rows and the key/value gradients are summed over ranks (see
nsa/distributed.py), so float tolerance.
"""
import pytest
import torch
import torch.distributed as dist

import nsa
from nsa import NSAConfig
from nsa.distributed import (ContextParallelLayout, context_parallel_attention, shard, shard_compressed,
                             unshard)

from dist_utils import spawn

NAMES = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa", "gates")
COMPRESSED = ("k_cmp", "v_cmp")
# n = 4 of up to ~10 blocks: besides the three forced blocks (0, J - 1, J) one is chosen by its score
CONFIG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=4, window=12)


def whole_batch(B, T, Tc, dtype, seed=0, Hkv=2, G=2, D=16):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    return dict(q=rand(B, T, Hkv * G, D), k_cmp=rand(B, Tc, Hkv, D), v_cmp=rand(B, Tc, Hkv, D),
                k_slc=rand(B, T, Hkv, D), v_slc=rand(B, T, Hkv, D), k_swa=rand(B, T, Hkv, D),
                v_swa=rand(B, T, Hkv, D), gates=torch.sigmoid(rand(B, T, Hkv * G, 3)))


def layout_and_batch(case, dtype, world_size=None, rank=None):
    """(layout, whole batch, cu_seqlens or None) of a case: ("dense", B, T) or ("packed", seq_lens)."""
    if case[0] == "dense":
        _, B, T = case
        layout = ContextParallelLayout(CONFIG, seq_len=T, batch=B, world_size=world_size, rank=rank)
        return layout, whole_batch(B, T, CONFIG.num_cmp_tokens(T), dtype), None
    seq_lens = case[1]
    layout = ContextParallelLayout(CONFIG, seq_lens=seq_lens, world_size=world_size, rank=rank)
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
    return layout, whole_batch(1, sum(seq_lens), layout.total_cmp, dtype), cu


def _cp_matches_single_process(rank, world_size, case, backend, dtype, tol, shared_kv):
    layout, x, cu = layout_and_batch(case, dtype)
    if shared_kv:
        x["k_swa"], x["v_swa"] = x["k_slc"], x["v_slc"]
    names = NAMES[:5] + NAMES[7:] if shared_kv else NAMES
    leaves = {n: x[n].clone().requires_grad_() for n in names}
    inputs = [leaves.get(n, leaves.get(n.replace("swa", "slc"))) for n in NAMES]
    o = nsa.nsa_attention(*inputs, CONFIG, cu_seqlens=cu, backend=backend)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = dict(zip(names, torch.autograd.grad(o, [leaves[n] for n in names], do)))

    local = {n: (shard_compressed if n in COMPRESSED else shard)(x[n], layout).requires_grad_() for n in names}
    local_inputs = [local.get(n, local.get(n.replace("swa", "slc"))) for n in NAMES]
    o_local = context_parallel_attention(*local_inputs, layout, backend=backend)
    local_grads = torch.autograd.grad(o_local, [local[n] for n in names], shard(do, layout))

    torch.testing.assert_close(o_local, shard(o, layout), rtol=tol, atol=tol)
    torch.testing.assert_close(unshard(o_local.detach(), layout), o.detach(), rtol=tol, atol=tol)
    for n, g in zip(names, local_grads):
        expected = (shard_compressed if n in COMPRESSED else shard)(grads[n], layout)
        torch.testing.assert_close(g, expected, rtol=tol, atol=tol, msg=lambda m: f"rank {rank}, d{n}: {m}")


@pytest.mark.parametrize("world_size,case,shared_kv", [
    (2, ("dense", 2, 70), False),  # 70 tokens: chunks of 17 and 18
    (4, ("packed", [37, 5, 66, 3]), True),  # short sequences leave some chunks empty; k_swa is k_slc: gathered once
])
def test_reference_cp_equals_single_process(world_size, case, shared_kv):
    spawn(_cp_matches_single_process, world_size, case, "reference", torch.float64, 1e-10, shared_kv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's case; on a GPU the world-of-one test and "
                    "benchmarks/bench_cp.py's check run the kernels")
def test_triton_cp_equals_single_process():
    spawn(_cp_matches_single_process, 2, ("packed", [23, 36]), "triton", torch.float32, 2e-5, False)


@pytest.mark.parametrize("case", [("dense", 3, 101), ("packed", [37, 5, 66, 0, 128])])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_layout_holds_every_token_once_and_balances_the_causal_work(case, world_size):
    layouts = [layout_and_batch(case, torch.float32, world_size, r)[0] for r in range(world_size)]
    total, total_cmp = layouts[0].total, layouts[0].total_cmp
    rows = torch.cat([lay.local_rows for lay in layouts])
    assert torch.equal(rows.sort().values, torch.arange(total))
    cmp_rows = torch.cat([lay.local_cmp_rows for lay in layouts])
    assert torch.equal(cmp_rows.sort().values, torch.arange(total_cmp))
    # compressed token i sits with the rank holding its last raw token i*d + l - 1
    seq_lens, start, start_c = layouts[0].seq_lens, 0, 0
    owner = torch.empty(total, dtype=torch.long)
    for r, lay in enumerate(layouts):
        owner[lay.local_rows] = r
    for n in seq_lens:
        for i in range(CONFIG.num_cmp_tokens(n)):
            end = start + i * CONFIG.cmp_stride + CONFIG.cmp_block - 1
            assert (layouts[owner[end]].local_cmp_rows == start_c + i).any()
        start, start_c = start + n, start_c + CONFIG.num_cmp_tokens(n)
    # causal work of a rank: the keys its queries see, sum of (position + 1). Chunks r and 2W-1-r of length c
    # cost c/2 (4Wc + 2) whatever r; rounding the bounds moves at most one token (cost <= n) at each chunk end
    work = [int((lay.tensors("cpu")["positions"] + 1).sum()) * (lay.batch if lay.dense else 1) for lay in layouts]
    assert max(work) - min(work) <= 4 * sum(seq_lens), work


def test_layout_refuses_bad_arguments_with_the_fix():
    with pytest.raises(ValueError, match="pass exactly one of seq_len .* or seq_lens"):
        ContextParallelLayout(CONFIG, world_size=2, rank=0)
    with pytest.raises(ValueError, match="batch must be 1"):
        ContextParallelLayout(CONFIG, seq_lens=[4, 5], batch=2, world_size=2, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size = 2\)"):
        ContextParallelLayout(CONFIG, seq_len=8, world_size=2, rank=2)
    layout = ContextParallelLayout(CONFIG, seq_len=40, batch=2, world_size=2, rank=1)
    with pytest.raises(ValueError, match=r"x must be the whole batch \[2, 40, \.\.\.\]"):
        shard(torch.zeros(2, 41, 3), layout)
    x = whole_batch(2, 40, CONFIG.num_cmp_tokens(40), torch.float64)
    local = {n: (shard_compressed if n in COMPRESSED else shard)(x[n], layout) for n in NAMES}
    local["q"] = x["q"]
    with pytest.raises(ValueError, match=r"q must be this rank's shard \[2, 20, \.\.\.\]"):
        context_parallel_attention(*(local[n] for n in NAMES), layout, backend="reference")


@pytest.mark.gpu
def test_gpu_world_of_one_equals_the_plain_op(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        for case in (("dense", 2, 4096), ("packed", [1000, 3000, 77])):
            layout, x, cu = layout_and_batch(case, torch.bfloat16)
            x = {n: v.cuda() for n, v in x.items()}
            leaves = {n: v.clone().requires_grad_() for n, v in x.items()}
            o = nsa.nsa_attention(*(leaves[n] for n in NAMES), CONFIG, cu_seqlens=None if cu is None else cu.cuda())
            do = torch.randn_like(o)
            grads = torch.autograd.grad(o, [leaves[n] for n in NAMES], do)
            local = {n: (shard_compressed if n in COMPRESSED else shard)(x[n], layout).requires_grad_() for n in NAMES}
            o_cp = context_parallel_attention(*(local[n] for n in NAMES), layout)
            grads_cp = torch.autograd.grad(o_cp, [local[n] for n in NAMES], shard(do, layout))
            torch.testing.assert_close(o_cp, shard(o, layout), rtol=2e-2, atol=2e-2)
            for n, g, g_ref in zip(NAMES, grads_cp, grads):
                expected = (shard_compressed if n in COMPRESSED else shard)(g_ref, layout)
                torch.testing.assert_close(g, expected, rtol=2e-2, atol=2e-2, msg=lambda m: f"d{n}: {m}")
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_context_parallel_step_has_no_host_sync(tmp_path):
    """Forward + backward of the CP op on a packed batch never waits for the device: the layout's lengths are host
    ints and its index maps are made once per device (world of one)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        layout, x, _ = layout_and_batch(("packed", [1000, 3000, 77]), torch.bfloat16)
        local = {n: (shard_compressed if n in COMPRESSED else shard)(v.cuda(), layout).requires_grad_()
                 for n, v in x.items()}
        context_parallel_attention(*(local[n] for n in NAMES), layout).sum().backward()  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            o = context_parallel_attention(*(local[n] for n in NAMES), layout)
            torch.autograd.grad(o, [local[n] for n in NAMES], torch.ones_like(o))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        dist.destroy_process_group()
