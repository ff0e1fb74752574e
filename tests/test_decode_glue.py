"""The decoding step's fused glue (ops/triton/decode_glue.py) against the layer's torch glue, the reference path.

Two copies of one prefilled cache take the same steps, one through each glue; after every step what the decoding
op receives (q, gates) and every cache buffer must agree: values, the cmp_src ring, the compressed values and the
lengths exactly (they are copies, and phi sees the same blocks), rotated keys and q bitwise on the GPU and, in the
interpreter (whose cos / sin are numpy's, up to one float32 ulp from torch's), to a few ulps of the dtype.
Prefills run the reference backend and most tests record the decoding op's inputs instead of running it: the
Triton op runs in the interpreter at seconds a call (tests/test_triton_decode.py tests it).
"""
import copy

import pytest
import torch

import nsa
from nsa import NativeSparseAttention, NSAConfig

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # -inf - -inf, log2(0) in the interpreter
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=12)
HIDDEN = 32
ROTATED = ("k_slc", "k_swa", "k_cmp")  # the buffers the glue rotates
COPIED = ("v_slc", "v_swa", "v_cmp", "ring_k", "ring_v", "cache_seqlens")


def make_layer(G, share_kv, dtype, Dk=8, Dv=6, Hkv=2):
    torch.manual_seed(0)
    layer = NativeSparseAttention(HIDDEN, G * Hkv, Hkv, Dk, Dv, config=CFG, share_kv=share_kv, backend="triton")
    for p in layer.parameters():  # random values everywhere (zero-initialized embeddings included)
        torch.nn.init.normal_(p, std=0.3)
    return layer.to(DEVICE, dtype)


def assert_rotated_close(got, want):
    """Bitwise on the GPU; in the interpreter within a few ulps of the dtype (numpy's cos / sin)."""
    if DEVICE == "cuda":
        assert torch.equal(got, want)
    else:
        tol = {torch.float32: 4e-6, torch.float16: 2e-3}[got.dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def prefilled(layer, x, lens, capacity, **kwargs):
    """A cache of `layer` prefilled with x [B, T, hidden] (row b's first lens[b] tokens) by the reference backend."""
    cache = layer.new_cache(x.shape[0], capacity, **kwargs)
    layer.backend = "reference"
    with torch.no_grad():
        layer.prefill(x, cache, prompt_lens=lens)
    layer.backend = "triton"
    return cache


@pytest.fixture
def op_inputs(monkeypatch):
    """layer.step's decoding op replaced by a recorder of its q and gates, returning zeros."""
    seen = []

    def record(q, k_cmp, v_cmp, k_slc, v_slc, k_swa, v_swa, gates, *args, **kwargs):
        seen.append((q.clone(), gates.clone()))
        return q.new_zeros(*q.shape[:3], v_cmp.shape[3])

    monkeypatch.setattr(nsa.layer, "nsa_decode_attention", record)
    return seen


def step_both(layer, x, caches, op_inputs):
    """layer.step(x) with the torch glue on caches[0] and the fused glue on caches[1]; compares what the decoding op
    received."""
    for fused, cache in zip((False, True), caches):
        layer.fuse_decode_glue = fused
        layer.step(x, cache)
    (q_torch, gates_torch), (q_fused, gates_fused) = op_inputs[-2:]
    assert_rotated_close(q_fused, q_torch)
    assert torch.equal(gates_fused, gates_torch)


def assert_caches_agree(torch_glue, fused):
    for name in COPIED:
        assert torch.equal(getattr(fused, name), getattr(torch_glue, name)), name
    for name in ROTATED:
        assert_rotated_close(getattr(fused, name), getattr(torch_glue, name))
    assert fused.host_seqlens == torch_glue.host_seqlens and fused.ring_start == torch_glue.ring_start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("G, share_kv", [(1, False), (4, True), (7, False)])
def test_fused_glue_equals_torch_glue(G, share_kv, dtype, op_inputs):
    """Rows at different positions (one shorter than l), steps of 1, 5 and 9 tokens (2 and 3 candidates; 9 is more
    than the ring's l - 1 = 7 slots with max_trim=0, so the ring wraps within a step), steps that complete a
    compressed token and steps that do not; Dk 8 != Dv 6."""
    layer = make_layer(G, share_kv, dtype)
    lens, chunks = [21, 9, 3], [1, 5, 9, 1]
    x = torch.randn(3, max(lens) + sum(chunks), HIDDEN, generator=torch.Generator().manual_seed(1))
    x = x.to(DEVICE, dtype)
    cache = prefilled(layer, x[:, :max(lens)], lens, max(lens) + sum(chunks), max_trim=0)
    caches = [cache, copy.deepcopy(cache)]
    completed = []
    with torch.no_grad():
        start = max(lens)
        for S in chunks:
            before = [CFG.num_cmp_tokens(n) for n in caches[1].host_seqlens]
            step_both(layer, x[:, start:start + S], caches, op_inputs)
            completed += [CFG.num_cmp_tokens(n) > m for n, m in zip(caches[1].host_seqlens, before)]
            assert_caches_agree(*caches)
            start += S
    assert any(completed) and not all(completed)


def test_fused_glue_with_head_dims_192_and_128(op_inputs):
    """Dk 192 / Dv 128 (Dk + Dv past 256, each head dim within the kernels' limit; not powers of two)."""
    layer = make_layer(2, False, torch.float32, Dk=192, Dv=128, Hkv=1)
    x = torch.randn(1, 12, HIDDEN, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    cache = prefilled(layer, x[:, :7], None, 12)
    caches = [cache, copy.deepcopy(cache)]
    with torch.no_grad():
        step_both(layer, x[:, 7:12], caches, op_inputs)  # completes compressed token 0
    assert_caches_agree(*caches)
    assert caches[1].k_cmp[:, 0].any()


def test_fused_glue_steps_equal_the_whole_sequence():
    """Tokens 14 (completing compressed token 2), 15 and 16 through the fused glue and the Triton decoding op: the
    outputs of the whole-sequence forward (float32; the forward on the reference backend)."""
    layer = make_layer(4, False, torch.float32)
    x = torch.randn(2, 17, HIDDEN, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cache = prefilled(layer, x[:, :14], None, 17)
    with torch.no_grad():
        ys = [layer.step(x[:, t:t + 1], cache) for t in range(14, 17)]
        assert layer._fused_glue(x, cache) and cache.host_seqlens == [17, 17]
        layer.backend = "reference"
        torch.testing.assert_close(torch.cat(ys, dim=1), layer(x)[:, 14:], rtol=1e-4, atol=1e-4)


def test_glue_choice():
    """Fused only with the Triton backend, a cache holding the layer's rotary frequencies, and the plain layer's
    _project / _compress; anything else keeps the torch glue."""
    layer = make_layer(2, False, torch.float32)
    x = torch.zeros(1, 1, HIDDEN, device=DEVICE)
    assert layer._fused_glue(x, layer.new_cache(1, 8))
    layer.fuse_decode_glue = False
    assert not layer._fused_glue(x, layer.new_cache(1, 8))
    layer.fuse_decode_glue = True
    plain = nsa.cache.NSACache(CFG, 1, 8, 2, 8, 6, False, torch.float32, DEVICE)  # no rope_base: no frequencies
    assert plain.rope_inv_freq is None and not layer._fused_glue(x, plain)
    layer.backend = "reference"
    assert not layer._fused_glue(x, layer.new_cache(1, 8))

    class OwnRotary(NativeSparseAttention):
        def _project(self, x, positions):
            return super()._project(x, positions)

    other = OwnRotary(HIDDEN, 2, 1, 8, config=CFG, backend="triton").to(DEVICE)
    assert not other._fused_glue(x, other.new_cache(1, 8))


def test_fused_step_runs_no_torch_glue(op_inputs):
    """The fused step leaves none of the torch glue's operations (rotary, cache writes, the ring gather) to torch:
    what torch still runs is the projections, the gates and phi."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    layer = make_layer(4, False, torch.float32)
    x = torch.randn(2, 9, HIDDEN, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    cache = prefilled(layer, x[:, :8], None, 9)
    with torch.no_grad(), Ops() as ops:
        layer.step(x[:, 8:], cache)
    assert {"decode_append_tokens", "decode_append_compressed", "addmm", "gelu"} <= ops.names
    assert not ops.names & {"cos", "sin", "cat", "index_put_", "gather", "index", "remainder"}


def test_fused_step_reads_nothing_back(monkeypatch):
    """A fused layer step (glue, phi, the decoding op) never waits on the device: no .item(), .tolist() or bool()."""
    layer = make_layer(2, True, torch.float32)
    x = torch.randn(2, 10, HIDDEN, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = prefilled(layer, x[:, :8], [8, 3], 10)

    def refuse(*_, **__):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    with torch.no_grad():
        layer.step(x[:, 8:], cache)
    assert cache.host_seqlens == [10, 5]


def _glue_case(S=2, seed=3):
    """A prefilled cache of a G = 2 layer, float32, rows at 22, 5 and 9 tokens (capacity 24), and the projections
    of S new tokens."""
    layer = make_layer(2, False, torch.float32)
    g = torch.Generator().manual_seed(seed)
    cache = prefilled(layer, torch.randn(3, 22, HIDDEN, generator=g).to(DEVICE), [22, 5, 9], 24)
    with torch.no_grad():
        x = torch.randn(3, S, HIDDEN, generator=g).to(DEVICE)
        q = layer.q_proj(x).view(3, S, 4, 8)
        kv = layer.kv_proj(x).view(3, S, 3, 2, 14)
    return layer, cache, q, kv


def _tokens_args(cache, q, kv):
    return (q, kv, cache.rope_inv_freq, cache.cache_seqlens, cache.ring_k, cache.ring_v, cache.k_slc, cache.v_slc,
            cache.k_swa, cache.v_swa, CFG.cmp_block, CFG.cmp_stride)


def _compressed_args(cache, kv, k_new, v_new):
    return (k_new, v_new, kv, cache.rope_inv_freq, cache.cache_seqlens, cache.ring_k, cache.ring_v, cache.k_cmp,
            cache.v_cmp, cache.capacity, CFG.cmp_block, CFG.cmp_stride)


@pytest.mark.parametrize("bad", [-1, 23, 24, 2**31 - 1, -2**31])
def test_rows_out_of_range_write_nothing(bad):
    """A device length out of range (behind the host mirror: a replayed graph) leaves that row's buffers untouched,
    the other rows written; every length still moves by S (the torch glue's `cache_seqlens += S`), and the
    decoding op then flags the row."""
    _, cache, q, kv = _glue_case()
    cache.cache_seqlens[1] = bad
    saved = {name: getattr(cache, name).clone() for name in ROTATED + COPIED[:-1]}
    with torch.no_grad():
        _, k_blocks, v_blocks = torch.ops.nsa.decode_append_tokens(*_tokens_args(cache, q, kv))
        k_new = torch.randn(3, 1, 2, 8, device=DEVICE)
        torch.ops.nsa.decode_append_compressed(*_compressed_args(cache, kv, k_new, torch.randn(3, 1, 2, 6,
                                                                                                device=DEVICE)))
    for name, before in saved.items():
        after = getattr(cache, name)
        assert torch.equal(after[1], before[1]), name
        assert not torch.equal(after[[0, 2]], before[[0, 2]]), name  # rows 0 and 2 were written (each buffer)
    wrapped = (bad + 2 + 2**31) % 2**32 - 2**31  # int32 arithmetic, as the torch glue's
    assert cache.cache_seqlens.tolist() == [24, wrapped, 11]


def test_custom_ops_opcheck():
    """Schemas (the declared mutations are the real ones), fake tensors and dispatch of the two glue ops."""
    _, cache, q, kv = _glue_case(S=1)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.nsa.decode_append_tokens, _tokens_args(cache, q, kv))
        k_new, v_new = torch.randn(3, 1, 2, 8, device=DEVICE), torch.randn(3, 1, 2, 6, device=DEVICE)
        torch.library.opcheck(torch.ops.nsa.decode_append_compressed, _compressed_args(cache, kv, k_new, v_new))


@pytest.mark.gpu
def test_generate_same_tokens_with_either_glue_bf16():
    """On the GPU in bfloat16: generate() gives the same tokens with the fused glue as with the torch glue, eager and
    replayed from a CUDA graph."""
    torch.manual_seed(0)
    cfg = nsa.ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, nsa=CFG)
    model = nsa.LanguageModel(cfg).to("cuda", torch.bfloat16).eval()
    prompt = torch.randint(0, 256, (3, 90), generator=torch.Generator().manual_seed(0)).cuda()
    runs = []
    for fused in (False, True):
        for block in model.blocks:
            block.attn.fuse_decode_glue = fused
        runs += [model.generate(prompt, 50, temperature=0, cuda_graph=graph) for graph in (False, True)]
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
