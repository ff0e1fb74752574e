"""The Triton selected-attention branch (ops/triton/selected.py) against a float64 PyTorch
computation given the same block ids: forward, backward (bitwise reproducible), varlen."""
import pytest
import torch

from nsa.ops.triton.selected_attention import selected_attention_bwd, selected_attention_fwd


def random_block_ids(T, Hkv, n, block, gen, drop=0.3):
    """[T, Hkv, n] int32: per row the forced blocks (0, J-1, J) plus random candidates <= J = t // block,
    some slots left unused on purpose, ascending then -1."""
    ids = torch.full((T, Hkv, n), -1, dtype=torch.int32)
    for t in range(T):
        J = t // block
        for g in range(Hkv):
            forced = sorted({0, J, max(J - 1, 0)})[:n]
            rest = [j for j in torch.randperm(J + 1, generator=gen).tolist() if j not in forced]
            rest = [j for j in rest if torch.rand((), generator=gen) > drop]
            chosen = sorted(forced + rest[:n - len(forced)])
            ids[t, g, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return ids


def reference_selected(q, k, v, ids, scale, block):
    """One sequence in float64: q [T, Hq, Dk], k/v [T, Hkv, D], ids [T, Hkv, n] -> o [T, Hq, Dv], lse [Hq, T]."""
    T, Hq, _ = q.shape
    G = Hq // k.shape[1]
    u = torch.arange(T)
    chosen = (ids.long()[..., None] == (u // block)).any(-2)  # [T, Hkv, T]
    visible = (chosen & (u[None, :] <= u[:, None])[:, None]).repeat_interleave(G, 1)  # [T, Hq, U]
    s = scale * torch.einsum("thd,uhd->thu", q, k.repeat_interleave(G, 1))
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("thu,uhd->thd", p, v.repeat_interleave(G, 1)), lse.T


def make_case(B, T, Hkv, G, Dk, Dv, n, block, dtype, seq_lens=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hkv * G, Dk, generator=gen).to(dtype)
    k = torch.randn(B, T, Hkv, Dk, generator=gen).to(dtype)
    v = torch.randn(B, T, Hkv, Dv, generator=gen).to(dtype)
    do = torch.randn(B, T, Hkv * G, Dv, generator=gen).to(dtype)
    if seq_lens is None:
        ids = torch.stack([random_block_ids(T, Hkv, n, block, gen) for _ in range(B)])
    else:
        ids = torch.cat([random_block_ids(L, Hkv, n, block, gen) for L in seq_lens])[None]
    return q, k, v, do, ids


def reference_all(q, k, v, do, ids, scale, block, seq_lens=None):
    """float64 o, lse, dq, dk, dv over every sequence (dense batch rows or packed sequences)."""
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    spans = [(b, 0, q.shape[1]) for b in range(q.shape[0])]
    if seq_lens is not None:
        starts = torch.tensor([0] + seq_lens).cumsum(0).tolist()
        spans = [(0, s, s + L) for s, L in zip(starts, seq_lens)]
    outs, lses = [], []
    for b, lo, hi in spans:
        o, lse = reference_selected(q[b, lo:hi], k[b, lo:hi], v[b, lo:hi], ids[b, lo:hi], scale, block)
        outs.append(o)
        lses.append(lse)
    o = torch.cat(outs, 0).reshape(q.shape[0], q.shape[1], q.shape[2], -1)
    lse = torch.cat(lses, 1).reshape(q.shape[2], q.shape[0], q.shape[1]).transpose(0, 1)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.double())
    return o.detach(), lse.detach(), dq, dk, dv


def assert_close(actual, expected, tol, name):
    err = (actual.double() - expected).abs().max().item()
    assert err <= tol * max(1.0, expected.abs().max().item()), f"{name}: max error {err}"


CASES = [  # B, T, Hkv, G, Dk, Dv, n, block
    (2, 37, 2, 1, 16, 16, 3, 8),
    (2, 45, 1, 2, 32, 16, 3, 16),
    (2, 33, 2, 4, 16, 32, 4, 8),
    (2, 21, 1, 16, 16, 16, 2, 8),
    (1, 50, 1, 3, 16, 16, 3, 24),  # G not a power of two, block not a power of two
    (1, 90, 1, 2, 16, 16, 2, 80),  # block above the 64-key inner chunk: two chunks per block
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}Hkv{}G{}Dk{}Dv{}n{}blk{}".format(*c))
def test_forward_backward(case):
    B, T, Hkv, G, Dk, Dv, n, block = case
    scale = Dk ** -0.5
    q, k, v, do, ids = make_case(B, T, Hkv, G, Dk, Dv, n, block, torch.float32)
    o, lse = selected_attention_fwd(q, k, v, ids, scale, block)
    ro, rlse, rdq, rdk, rdv = reference_all(q, k, v, do, ids, scale, block)
    assert o.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (B, Hkv * G, T)
    assert_close(o, ro, 1e-5, "o")
    assert_close(lse, rlse, 1e-5, "lse")
    dq, dk, dv = selected_attention_bwd(do, q, k, v, o, lse, ids, scale, block)
    for name, x, r in (("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(x, r, 1e-4, name)


@pytest.mark.parametrize("rows", [32, 64])
def test_query_tiles_of_several_queries(rows):
    """KernelOptions.selected_fwd/dq.block_m: programs of rows // G queries walk the union of their blocks (G = 16:
    several queries per program instead of one); same results as the reference, packed sequences included."""
    from nsa import KernelOptions, Launch
    seq_lens = [23, 9, 40]
    Hkv, G, Dk, Dv, n, block = 1, 16, 16, 16, 3, 8
    q, k, v, do, ids = make_case(1, sum(seq_lens), Hkv, G, Dk, Dv, n, block, torch.float32, seq_lens, seed=4)
    cu = torch.tensor([0] + seq_lens).cumsum(0).to(torch.int32)
    options = KernelOptions(selected_fwd=Launch(block_m=rows), selected_dq=Launch(block_m=rows))
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, block, cu_seqlens=cu, options=options)
    grads = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block, cu_seqlens=cu, options=options)
    ro, rlse, rdq, rdk, rdv = reference_all(q, k, v, do, ids, 0.25, block, seq_lens)
    assert_close(o, ro, 1e-5, "o")
    assert_close(lse, rlse, 1e-5, "lse")
    for name, x, r in zip(("dq", "dk", "dv"), grads, (rdq, rdk, rdv)):
        assert_close(x, r, 1e-4, name)


def test_float16():
    B, T, Hkv, G, Dk, Dv, n, block = 1, 40, 2, 2, 32, 16, 3, 8
    q, k, v, do, ids = make_case(B, T, Hkv, G, Dk, Dv, n, block, torch.float16, seed=1)
    o, lse = selected_attention_fwd(q, k, v, ids, 0.2, block)
    dq, dk, dv = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.2, block)
    ro, rlse, rdq, rdk, rdv = reference_all(q, k, v, do, ids, 0.2, block)
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == torch.float16
    for name, x, r in (("o", o, ro), ("lse", lse, rlse), ("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(x, r, 1e-2, name)


def test_varlen_and_empty_rows():
    seq_lens = [17, 0, 30, 1]
    Hkv, G, Dk, Dv, n, block = 2, 2, 16, 32, 3, 8
    q, k, v, do, ids = make_case(1, sum(seq_lens), Hkv, G, Dk, Dv, n, block, torch.float32, seq_lens, seed=2)
    ids[0, 5, 1] = -1  # a row that selected nothing: lse = -inf, o = 0, no gradient
    cu = torch.tensor([0] + seq_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, block, cu_seqlens=cu, max_seqlen=max(seq_lens))
    ro, rlse, rdq, rdk, rdv = reference_all(q, k, v, do, ids, 0.25, block, seq_lens)
    assert torch.isneginf(lse[0, 2:4, 5]).all() and (o[0, 5, 2:4] == 0).all()
    assert_close(o, ro, 1e-5, "o")
    assert_close(lse.nan_to_num(neginf=0.0), rlse.nan_to_num(neginf=0.0), 1e-5, "lse")
    grads = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block, cu_seqlens=cu)
    for name, x, r in zip(("dq", "dk", "dv"), grads, (rdq, rdk, rdv)):
        assert_close(x, r, 1e-4, name)


def test_backward_is_bitwise_reproducible():
    B, T, Hkv, G, Dk, Dv, n, block = 1, 64, 1, 4, 16, 16, 3, 8
    q, k, v, do, ids = make_case(B, T, Hkv, G, Dk, Dv, n, block, torch.float32, seed=3)
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, block)
    # a small chunk splits the long lists (block 0 is chosen by every query) over several work items
    first = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block, chunk=16)
    again = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block, chunk=16)
    whole = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block)  # one item per block
    for a, b, c in zip(first, again, whole):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("G", [1, 16])
def test_given_delta_and_dq_accumulation(G):
    """delta= and add_dq_to= (NSA's op passes both) give the plain call's gradients: dk, dv bitwise with the delta
    the plain call makes, and dq added to the given tensor in float32."""
    q, k, v, do, ids = make_case(2, 40, 1, G, 16, 32, 3, 8, torch.float32, seed=G)
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, 8)
    dq, dk, dv = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, 8)
    delta = (do * o).sum(-1).transpose(1, 2)
    base = torch.randn_like(q)
    into = base.clone()
    gq, gk, gv = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, 8, delta=delta, add_dq_to=into)
    assert gq is into
    torch.testing.assert_close(gq, base + dq, rtol=1e-6, atol=1e-6)  # delta summed in another order
    torch.testing.assert_close(gk, dk, rtol=1e-5, atol=1e-5)
    assert torch.equal(gv, dv)  # dv does not depend on delta


def test_backward_extras_are_checked():
    q, k, v, do, ids = make_case(1, 20, 1, 2, 16, 16, 2, 8, torch.float32)
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, 8)
    with pytest.raises(ValueError, match="delta must be float32"):
        selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, 8, delta=torch.zeros(1, 2, 20, dtype=torch.float64))
    with pytest.raises(ValueError, match="delta must be float32"):
        selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, 8, delta=torch.zeros(1, 20, 2))
    with pytest.raises(ValueError, match="add_dq_to must be a contiguous"):
        selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, 8, add_dq_to=torch.zeros_like(q).transpose(1, 2))


def test_rejects_large_head_dim():
    q = torch.zeros(1, 4, 1, 512)
    with pytest.raises(ValueError, match="256"):
        selected_attention_fwd(q, q, q, torch.zeros(1, 4, 1, 1, dtype=torch.int32), 1.0, 4)


@pytest.mark.parametrize("G, wide, narrow, warps", [(1, (16, 16), None, (1, 2)), (2, (16, 32), (8, 16), (2, 2)),
                                                    (3, None, (5, 16), (1, 2)), (4, (16, 64), (4, 16), (4, 4)),
                                                    (16, (4, 64), (1, 16), (4, 4)), (32, (2, 64), (1, 32), (4, 4)),
                                                    (64, (1, 64), None, (4, 4))])
def test_default_query_tiles(G, wide, narrow, warps):
    """By default the forward and dq walk 64-row tiles of at most 16 queries (warps by the padded rows) and, when a
    16-row tile holds fewer queries, also those (the wide tiles that share too few blocks go to them); a 16-row tile
    alone when it does not divide the wide one. A Launch's block_m sets the one tile (no 16-query cap), its
    num_warps the warps."""
    from nsa import Launch
    from nsa.ops.triton.selected_attention import _walk_tiles
    for kernel in (0, 1):
        tiles = _walk_tiles(Launch(), 64, G, kernel)
        assert [(t["BLOCK_T"], t["BLOCK_M"]) for t, _ in tiles] == [x for x in (wide, narrow) if x]
        assert tiles[0][1]["num_warps"] == warps[kernel] and tiles[0][1]["BLOCK_N"] == 64
        if wide and narrow:
            assert tiles[1][1]["num_warps"] == {16: (1, 2), 32: (2, 2)}[narrow[1]][kernel]
    assert [t for t, _ in _walk_tiles(Launch(block_m=16), 64, 16, 0)] == [dict(BLOCK_T=1, BLOCK_M=16)]
    assert [t for t, _ in _walk_tiles(Launch(block_m=128), 64, 1, 0)] == [dict(BLOCK_T=128, BLOCK_M=128)]
    assert _walk_tiles(Launch(block_m=64, num_warps=8), 32, 16, 1)[0][1] == dict(BLOCK_N=32, num_warps=8, num_stages=2)


@pytest.mark.parametrize("G, varlen", [(16, False), (16, True), (4, False), (4, True)])
def test_wide_and_narrow_tiles_split_the_queries(G, varlen):
    """By default (G = 16: 4-query and one-query tiles; G = 4: 16-query and 4-query tiles) a wide tile is walked as one
    when twice its union is at most the sum of its narrow tiles' unions, else by its narrow tiles (two launches over
    the same queries, each skipping the other's). Ids where the queries of every other wide tile choose the same
    blocks and the rest random ones, so that both launches walk some tiles; same results as the reference, and dq
    added to add_dq_to once (a query walked twice would add twice)."""
    from nsa import Launch
    from nsa.ops.triton.selected_attention import _walk_tiles
    (wide, _), (narrow, _) = _walk_tiles(Launch(), 2, G, 0)
    W, N = wide["BLOCK_T"], narrow["BLOCK_T"]
    seq_lens = [61, 30] if varlen else [64]
    Hkv, Dk, Dv, n, block = 1, 16, 16, 6, 2
    q, k, v, do, ids = make_case(1, sum(seq_lens), Hkv, G, Dk, Dv, n, block, torch.float32,
                                 seq_lens if varlen else None, seed=5)
    starts = [0, *torch.tensor(seq_lens).cumsum(0).tolist()]
    for s0, L in zip(starts, seq_lens):  # in every other wide tile, every query takes its tile's first query's blocks
        for t in range(0, L, 2 * W):
            ids[0, s0 + t:s0 + min(t + W, L)] = ids[0, s0 + t]

    def union(a, b):
        return len(set(ids[0, a:b].flatten().tolist()) - {-1})
    chosen = [2 * union(s0 + t, s0 + min(t + W, L))
              <= sum(union(s0 + u, s0 + min(u + N, L)) for u in range(t, min(t + W, L), N))
              for s0, L in zip(starts, seq_lens) for t in range(0, L, W)]
    assert any(chosen) and not all(chosen)  # both launches walk some tiles
    cu = torch.tensor(starts).to(torch.int32) if varlen else None
    o, lse = selected_attention_fwd(q, k, v, ids, 0.25, block, cu_seqlens=cu)
    base = torch.randn_like(q)
    dq, dk, dv = selected_attention_bwd(do, q, k, v, o, lse, ids, 0.25, block, cu_seqlens=cu, add_dq_to=base.clone())
    ro, rlse, rdq, rdk, rdv = reference_all(q, k, v, do, ids, 0.25, block, seq_lens if varlen else None)
    assert_close(o, ro, 1e-5, "o")
    assert_close(lse, rlse, 1e-5, "lse")
    for name, x, r in (("dq", dq, base.double() + rdq), ("dk", dk, rdk), ("dv", dv, rdv)):
        assert_close(x, r, 1e-4, name)