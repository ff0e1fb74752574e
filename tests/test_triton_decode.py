"""Triton decoding step (ops/triton/decode.py) against the reference decoding step.

Cache buffers hold random large values past each row's length (they must never be read). Selections
are compared exactly: inputs are random, so near-ties are unlikely at these sizes and the seeds are fixed.
"""
import functools

import pytest
import torch

import nsa
from nsa.ops import nsa_decode_attention
from nsa.ops.triton import decode
from test_decode_reference import cache_from
from test_reference import make_inputs

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # -inf - -inf, log2(0) in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIG_A = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=12)
CONFIG_B = nsa.NSAConfig(cmp_block=16, cmp_stride=8, slc_block=32, num_selected=4, window=24)
NAMES = ("k_cmp", "v_cmp", "k_slc", "v_slc", "k_swa", "v_swa")


def decode_case(lens, S, Hq, Hkv, Dk, Dv, config, dtype, capacity, seed=0, device=DEVICE):
    """(args of nsa_decode_attention in float64 and in dtype, reference block ids [B, S, Hkv, n]).

    Row b holds lens[b] tokens; the float64 args carry exactly the dtype's values.
    """
    x = make_inputs(len(lens), max(lens), Hq, Hkv, Dk, Dv, config, seed=seed)
    x = {k: v.to(device=device, dtype=dtype).double() for k, v in x.items()}
    cache = cache_from(x, lens, capacity, config.num_cmp_tokens(capacity), config)
    q = torch.stack([x["q"][b, n - S:n] for b, n in enumerate(lens)])
    gates = torch.stack([x["gates"][b, n - S:n] for b, n in enumerate(lens)])
    args64 = [q] + [cache[k] for k in NAMES] + [gates]
    args64 = [a.to(dtype).double().to(device) for a in args64]
    ids = [nsa.select_blocks(x["q"][b:b + 1, :n], x["k_cmp"][b:b + 1, :config.num_cmp_tokens(n)], config,
                             backend="reference")[0, n - S:n] for b, n in enumerate(lens)]
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    return args64, [a.to(dtype) for a in args64], seq_lens, torch.stack(ids).int().to(device)


CASES = [  # (config, lens, capacity): a full row, a middle one, one shorter than l (no compressed token), one of S
    (CONFIG_A, [70, 37, 7], 80),
    (CONFIG_B, [150, 61, 15], 160),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G", [1, 4, 16])
@pytest.mark.parametrize("S", [1, 3])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_decode_matches_reference(case, S, G, dtype):
    config, lens, capacity = CASES[case]
    Hkv = 2 if G < 16 else 1
    lens = lens + [S]
    args64, args, seq_lens, ids_ref = decode_case(lens, S, G * Hkv, Hkv, 24, 40, config, dtype, capacity,
                                                  seed=case * 100 + S * 10 + G)
    ref = nsa_decode_attention(*args64[:-1], args64[-1], seq_lens, config, backend="reference")
    o, ids = decode.nsa_decode_attention(*args, seq_lens, config, 24 ** -0.5, return_block_ids=True)
    assert o.dtype == dtype and o.shape == ref.shape
    assert torch.equal(ids, ids_ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(o.double(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("config", [
    nsa.NSAConfig(cmp_block=12, cmp_stride=4, slc_block=24, num_selected=3, window=10),  # l', l/d not powers of 2
    nsa.NSAConfig(cmp_block=8, cmp_stride=8, slc_block=16, num_selected=2, window=5),  # l = d, n < 3
])
def test_decode_other_configs(config):
    args64, args, seq_lens, ids_ref = decode_case([90, 41, 11, 3], 3, 8, 2, 16, 24, config, torch.float32, 96)
    ref = nsa_decode_attention(*args64[:-1], args64[-1], seq_lens, config, backend="reference")
    o, ids = decode.nsa_decode_attention(*args, seq_lens, config, 0.25, return_block_ids=True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("S", [1, 3])
def test_decode_few_selected_blocks(n, S):
    """num_selected = 1 (a top-1 over a [1, K] chunk, which tl.topk cannot do) and 2 run and match the reference."""
    config = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=n, window=12)
    args64, args, seq_lens, ids_ref = decode_case([70, 37, 7, S], S, 8, 2, 16, 16, config, torch.float32, 80, seed=n)
    ref = nsa_decode_attention(*args64, seq_lens, config, backend="reference")
    o, ids = decode.nsa_decode_attention(*args, seq_lens, config, 0.25, return_block_ids=True)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)


def test_training_op_with_one_selected_block():
    """The training op's selection and output with num_selected = 1, against the reference."""
    config = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=1, window=12)
    x = {k: v.float() for k, v in make_inputs(2, 40, 4, 2, 16, 16, config, seed=3).items()}
    ids = nsa.select_blocks(x["q"], x["k_cmp"], config, backend="triton")
    assert torch.equal(ids, nsa.select_blocks(x["q"], x["k_cmp"], config, backend="reference"))
    torch.testing.assert_close(nsa.nsa_attention(**x, config=config, backend="triton"),
                               nsa.nsa_attention(**x, config=config, backend="reference"), rtol=1e-5, atol=1e-5)


def test_decode_dispatch_and_single_split():
    """The public entry runs these kernels with backend='triton'; one program per group (no split) gives the same."""
    args64, args, seq_lens, _ = decode_case([70, 37, 1], 1, 4, 2, 16, 16, CONFIG_A, torch.float32, 80)
    o = nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton")
    one_program = nsa.KernelOptions(decode_programs=1)
    torch.testing.assert_close(nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton",
                                                    kernel_options=one_program), o, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity", [80, 64])
def test_decode_scratch_reads_and_writes(monkeypatch, capacity):
    """Scratch buffers start as NaN (as stale memory may be) and are followed by guard elements.

    The step must read only what it wrote and write only inside each buffer. Length 53 puts the newest
    query where the last compressed tile sees only its halo token (the interpreter's tiles: 16 compressed
    tokens, 3 selection blocks), so that tile's split attends to nothing of its own; a capacity of 64
    (4 selection blocks) ends inside the last row's second tile, whose block scores must not spill over.
    """
    args64, args, seq_lens, _ = decode_case([53, 37, 64], 1, 8, 2, 16, 16, CONFIG_A, torch.float32, capacity)
    ref = nsa_decode_attention(*args64[:-1], args64[-1], seq_lens, CONFIG_A, backend="reference")
    guarded = _guarded_empty(monkeypatch)
    o = decode.nsa_decode_attention(*args, seq_lens, CONFIG_A, 16 ** -0.5)
    monkeypatch.undo()
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
    _assert_guards_intact(guarded)


@pytest.mark.parametrize("capacity", [75, 80])
def test_decode_never_reads_past_a_row_or_the_capacity(capacity):
    """Cache slots past each row's length, and memory past the capacity, hold NaN: the step must not load them
    (p = 0 times NaN is NaN). A capacity of 75 is not a multiple of l' = 16, so the full row's last selection block
    reaches past the buffer (here into NaN padding of the same storage)."""
    lens = [capacity, 37, 50]
    args64, args, seq_lens, _ = decode_case(lens, 1, 8, 2, 16, 16, CONFIG_A, torch.float32, capacity)
    ref = nsa_decode_attention(*args64[:-1], args64[-1], seq_lens, CONFIG_A, backend="reference")
    q, *cache, gates = args
    poisoned = []
    for name, x in zip(NAMES, cache):
        whole = torch.full((x.shape[0], x.shape[1] + 16, *x.shape[2:]), float("nan"), dtype=x.dtype, device=x.device)
        for b, n in enumerate(lens):
            valid = CONFIG_A.num_cmp_tokens(n) if name.endswith("cmp") else n
            whole[b, :valid] = x[b, :valid]
        poisoned.append(whole[:, :x.shape[1]])
    o = decode.nsa_decode_attention(q, *poisoned, gates, seq_lens, CONFIG_A, 16 ** -0.5)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)


def test_decode_no_host_sync(monkeypatch):
    """With host_seqlens (the cache's host copy) nothing is read back to the host: no .item(), no .tolist()."""
    _, args, seq_lens, _ = decode_case([40, 9], 2, 4, 1, 16, 16, CONFIG_A, torch.float32, 48)

    def refuse(*_, **__):
        raise AssertionError("host sync")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    monkeypatch.setattr(torch.Tensor, "tolist", refuse)
    nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton", host_seqlens=[40, 9])
    with pytest.raises(ValueError, match=r"host_seqlens\[1\] = 49 \(row 1\)"):
        nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton", host_seqlens=[40, 49])


# ----------------------------------------------------------------------------------------------
# Untrusted lengths: a ValueError eagerly; inside the kernels, NaN rows and the error flag, nothing out of bounds

HOSTILE = [21, 0, -5, 2, 1000, 2 ** 31 - 1, -2 ** 31]  # capacity 20, S = 3: past it, empty, negative, < S, huge


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("bad", HOSTILE)
def test_decode_rejects_lengths_out_of_range(bad, backend):
    _, args, _, _ = decode_case([20, 9], 3, 4, 2, 16, 16, CONFIG_A, torch.float32, 20)
    with pytest.raises(ValueError, match=rf"cache_seqlens\[1\] = {bad} \(row 1\)"):
        nsa_decode_attention(*args, torch.tensor([20, bad], dtype=torch.int32), CONFIG_A, backend=backend)
    with pytest.raises(ValueError, match=rf"host_seqlens\[1\] = {bad} \(row 1\)"):
        nsa_decode_attention(*args, torch.tensor([20, 9], dtype=torch.int32), CONFIG_A, backend=backend,
                             host_seqlens=[20, bad])


@pytest.mark.parametrize("cmp_slots", [0, 2])
def test_decode_rejects_lengths_past_the_compressed_capacity(cmp_slots):
    """k_cmp with fewer slots than the row's compressed tokens (Tc(20) = 4 with l = 8, d = 4)."""
    _, args, seq_lens, _ = decode_case([20, 9], 1, 4, 2, 16, 16, CONFIG_A, torch.float32, 20)
    args[1:3] = [x[:, :cmp_slots] for x in args[1:3]]
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 20 \(row 0\) needs 4 compressed tokens"):
        nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton")
    with pytest.raises(TypeError, match="host_seqlens must be None or a list of 2 ints"):
        nsa_decode_attention(*args, seq_lens, CONFIG_A, backend="triton", host_seqlens=seq_lens)


def _guarded_empty(monkeypatch, guard=64):
    """torch.empty poisoned (NaN / 12345) and followed by `guard` elements; returns the list of whole buffers."""
    empty, guarded = torch.empty, []

    def poisoned(*shape, **kwargs):
        shape = torch.Size(shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)
        whole = empty(shape.numel() + guard, **kwargs)
        whole.fill_(float("nan") if whole.is_floating_point() else 12345)
        guarded.append(whole)
        return whole[:shape.numel()].view(shape)

    monkeypatch.setattr(torch, "empty", poisoned)
    return guarded


def _assert_guards_intact(guarded, guard=64):
    for whole in guarded:
        tail = whole[-guard:]
        assert (tail.isnan().all() if whole.is_floating_point() else (tail == 12345).all()), "write past a buffer"


@pytest.mark.parametrize("cmp_slots", [None, 0])
def test_decode_device_guard_on_hostile_lengths(monkeypatch, cmp_slots):
    """The kernels alone (no host check: the capture path): each hostile row gets NaN outputs and block ids -1 and
    sets the flag; the valid rows equal, bit for bit, a run where the hostile row holds a valid length; no scratch
    buffer is written past its end. cmp_slots=0: a k_cmp with no slot at all (rows of >= l tokens are hostile)."""
    S, lens = 3, [20, 9, 5]
    _, args, _, _ = decode_case(lens, S, 8, 2, 16, 16, CONFIG_A, torch.float32, 20)
    if cmp_slots is not None:
        args[1:3] = [x[:, :cmp_slots] for x in args[1:3]]
        lens = [7, 3, 5]  # Tc = 0: valid without compressed slots
    valid = torch.tensor(lens, dtype=torch.int32)
    expected, expected_ids = decode.nsa_decode_attention(*args, valid, CONFIG_A, 0.25, return_block_ids=True)
    hostile = HOSTILE + ([8, 20] if cmp_slots == 0 else [])  # Tc(8) = 1 > 0 slots
    for bad in hostile:
        seq_lens = torch.tensor([lens[0], bad, lens[2]], dtype=torch.int32)
        flag = torch.zeros(1, dtype=torch.int32)
        guarded = _guarded_empty(monkeypatch)
        o, ids = decode.nsa_decode_attention(*args, seq_lens, CONFIG_A, 0.25, error_flag=flag, return_block_ids=True)
        monkeypatch.undo()
        _assert_guards_intact(guarded)
        assert flag.tolist() == [1], bad
        assert o[1].isnan().all() and (ids[1] == -1).all(), bad
        assert torch.equal(o[[0, 2]], expected[[0, 2]]) and torch.equal(ids[[0, 2]], expected_ids[[0, 2]]), bad
    flag = torch.zeros(1, dtype=torch.int32)
    decode.nsa_decode_attention(*args, valid, CONFIG_A, 0.25, error_flag=flag)
    assert flag.tolist() == [0]


# (input, index, value): row 0's query head 5; keys its queries see (row 2's: its last query only); hidden keys
NONFINITE = {
    "q": [("q", (0, 1, 5, 3), float("nan"))],
    "k_cmp": [("k_cmp", (1, 2, 0, 0), float("nan"))],
    "k_slc": [("k_slc", (2, 49, 1, 4), float("nan"))],  # the current block J(t), always selected
    "k_swa inf": [("k_swa", (3, 27, 0), float("inf"))],  # the whole key: q . k = inf - inf
    "k_cmp inf": [("k_cmp", (1, 0, 1), float("inf"))],
    "hidden": [("k_slc", (2, 50, 0, 0), float("nan")), ("k_cmp", (3, 6, 0, 0), float("nan")),  # past the length
               ("k_swa", (1, 0, 0, 0), float("nan"))],  # outside the window
}


@pytest.mark.parametrize("pattern", NONFINITE)
def test_decode_nan_and_inf_like_the_reference(pattern):
    """The same outputs are NaN as in the reference (a NaN score must reach l and acc and survive every merge), and
    the finite ones agree; only the groups holding a NaN query may select other blocks (a NaN group score)."""
    lens = [40, 30, 50, 28]
    args64, args, seq_lens, _ = decode_case(lens, 2, 8, 2, 16, 16, CONFIG_A, torch.float32, 64)
    for name, index, value in NONFINITE[pattern]:
        for a in (args64, args):
            a[(("q",) + NAMES).index(name)][index] = value
    ref = nsa_decode_attention(*args64, seq_lens, CONFIG_A, backend="reference")
    o = decode.nsa_decode_attention(*args, seq_lens, CONFIG_A, 0.25)
    assert ref.isnan().any() == (pattern != "hidden")
    assert torch.equal(o.isnan(), ref.isnan())
    same = ~ref.isnan()
    if pattern == "q":
        same[0, 1, 4:] = False  # the other heads of the NaN head's group
    torch.testing.assert_close(o.double()[same], ref[same], rtol=1e-5, atol=1e-5)


def test_decode_refuses_blocks_too_long_for_float16_pooling():
    config = nsa.NSAConfig(cmp_block=4096, cmp_stride=2048, slc_block=4096, num_selected=2, window=8)
    _, args, seq_lens, _ = decode_case([20], 1, 2, 1, 16, 16, config, torch.float16, 24)
    with pytest.raises(ValueError, match="cmp_block <= 2048 or slc_block <= 2048"):
        decode.nsa_decode_attention(*args, seq_lens, config, 0.25)


def test_decode_rejects_grad():
    _, args, seq_lens, _ = decode_case([20], 1, 2, 1, 16, 16, CONFIG_A, torch.float32, 24)
    args[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference only"):
        decode.nsa_decode_attention(*args, seq_lens, CONFIG_A, 0.25)
    with torch.no_grad():
        decode.nsa_decode_attention(*args, seq_lens, CONFIG_A, 0.25)


def _captured(step):
    """(a CUDA graph of step(), its static output), step() run once on a side stream first (compiles its kernels)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_o = step()
    return graph, static_o


# ----------------------------------------------------------------------------------------------
# GPU: long context in bfloat16, CUDA graphs


def _agreeing_rows(ids, ids_ref, min_fraction):
    """Rows (b, s) whose selections equal the reference's for every group.

    At least min_fraction of the (b, s, group) selections must be equal: a near-tie in the block scores may
    flip one, a wrong kernel flips most.
    """
    same_group = (ids == ids_ref).all(-1)
    assert same_group.float().mean() >= min_fraction, f"selections equal: {same_group.tolist()}"
    return same_group.all(-1)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [4, 16])
def test_decode_long_context_bf16(G):
    config = nsa.NSAConfig()
    Hkv = 2
    lens = [8192, 5000]
    args64, args, seq_lens, ids_ref = decode_case(lens, 1, G * Hkv, Hkv, 128, 128, config, torch.bfloat16, 8192)
    ref = nsa_decode_attention(*args, seq_lens, config, backend="reference").float()
    o, ids = decode.nsa_decode_attention(*args, seq_lens, config, 128 ** -0.5, return_block_ids=True)
    same = _agreeing_rows(ids, ids_ref, 0.75)
    torch.testing.assert_close(o.float()[same], ref[same], rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new queries and lengths: the same output as an eager call."""
    config = nsa.NSAConfig()
    _, args, seq_lens, _ = decode_case([3000, 1200], 1, 16, 2, 128, 128, config, torch.bfloat16, 4096)
    q, *cache, gates = args
    static_q, static_gates, static_lens = q.clone(), gates.clone(), seq_lens.clone()
    scale = 128 ** -0.5

    def step():
        return decode.nsa_decode_attention(static_q, *cache, static_gates, static_lens, config, scale)

    graph, static_o = _captured(step)
    for lens in ([3000, 1200], [2048, 4096], [64, 1]):
        static_q.copy_(torch.randn_like(q))
        static_gates.copy_(torch.rand_like(gates))
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.testing.assert_close(static_o, step(), rtol=0, atol=0)


@pytest.mark.gpu
def test_decode_selection_is_the_same_on_every_run():
    """200 calls on the same inputs give the same ids and output, bit for bit: the step has no atomics and no
    order-dependent sums, and a race between its kernels' scratch writes and reads would show here."""
    config = nsa.NSAConfig()
    B, Hq, Hkv, D, capacity = 16, 64, 4, 128, 8192

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    tokens = (config.num_cmp_tokens(capacity),) * 2 + (capacity,) * 4  # k/v_cmp, k/v_slc, k/v_swa
    args = [rand(B, 1, Hq, D)] + [rand(B, n, Hkv, D) for n in tokens] + [torch.sigmoid(rand(B, 1, Hq, 3))]
    seq_lens = torch.randint(1, capacity + 1, (B,), device="cuda", dtype=torch.int32)
    step = functools.partial(decode.nsa_decode_attention, *args, seq_lens, config, D ** -0.5, return_block_ids=True)
    o0, ids0 = step()
    for _ in range(200):
        o, ids = step()
        assert torch.equal(ids, ids0)
        assert torch.equal(o, o0)


@pytest.mark.gpu
def test_decode_cuda_graph_flags_hostile_lengths():
    """Captured without host_seqlens (capture skips the host check), replayed with hostile lengths: that row is NaN
    and error_flag is set; the other row equals the eager step bit for bit."""
    config = nsa.NSAConfig()
    _, args, seq_lens, _ = decode_case([3000, 1200], 1, 16, 2, 128, 128, config, torch.bfloat16, 4096)
    static_lens, flag = seq_lens.clone(), torch.zeros(1, dtype=torch.int32, device="cuda")

    def step():
        return nsa_decode_attention(*args, static_lens, config, backend="triton", error_flag=flag)

    graph, static_o = _captured(step)
    expected = nsa_decode_attention(*args, seq_lens, config, backend="triton")
    for bad in [4097, 0, -5, 10 ** 6, 2 ** 31 - 1, -2 ** 31]:
        flag.zero_()
        static_lens.copy_(torch.tensor([3000, bad], dtype=torch.int32))
        graph.replay()
        assert flag.item() == 1 and static_o[1].isnan().all(), bad
        assert torch.equal(static_o[0], expected[0]), bad
