"""KV cache: the layer fed one token at a time, or in chunks, equals the whole-sequence forward at every position."""
import random

import pytest
import torch

import nsa
from nsa import NativeSparseAttention, NSAConfig
from nsa.cache import KVCache, ModelCache, NSACache

# T = 70 crosses compressed tokens (every 4 from position 7), selection blocks of 16 and the window of 12
CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=12)
HIDDEN, T = 32, 70


def make_layer(share_kv=False, seed=0):
    torch.manual_seed(seed)
    layer = NativeSparseAttention(HIDDEN, 4, 2, 8, 6, config=CFG, share_kv=share_kv, backend="reference").double()
    for p in layer.parameters():  # random values everywhere (zero-initialized embeddings included)
        torch.nn.init.normal_(p, std=0.3)
    return layer


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def feed(layer, x, cache, chunks):
    """Prefills x[:, :chunks[0]], then steps the next chunks; returns all outputs [B, sum(chunks), hidden]."""
    ys, start = [layer.prefill(x[:, :chunks[0]], cache)], chunks[0]
    for S in chunks[1:]:
        ys.append(layer.step(x[:, start:start + S], cache))
        start += S
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("share_kv", [False, True])
def test_one_token_at_a_time_equals_forward(share_kv):
    layer = make_layer(share_kv)
    x = randn(2, T, HIDDEN)
    full = layer(x)
    _, k_cmp, v_cmp = layer.nsa_inputs(x)[:3]
    cache = layer.new_cache(2, T)
    ys = [layer.prefill(x[:, :1], cache)]
    for t in range(1, T):
        ys.append(layer.step(x[:, t:t + 1], cache))
        # compressed token i is in the cache exactly once raw token i*d + l - 1 has arrived
        Tc = CFG.num_cmp_tokens(t + 1)
        torch.testing.assert_close(cache.k_cmp[:, :Tc], k_cmp[:, :Tc], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache.v_cmp[:, :Tc], v_cmp[:, :Tc], rtol=1e-12, atol=1e-12)
        # and no earlier: a step's candidates that complete nothing write only the spare slot past cmp_capacity
        assert not cache.k_cmp[:, Tc:].any() and not cache.v_cmp[:, Tc:].any()
    assert cache.host_seqlens == [T, T] and cache.cache_seqlens.tolist() == [T, T]
    torch.testing.assert_close(torch.cat(ys, dim=1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_chunks_equal_forward(seed):
    rng = random.Random(seed)
    chunks = [rng.randint(1, 20)]
    while sum(chunks) < T:
        chunks.append(min(rng.randint(1, 20), T - sum(chunks)))
    layer = make_layer(seed=seed)
    x = randn(2, T, HIDDEN, seed=seed)
    cache = layer.new_cache(2, T + 5, max_trim=0)  # steps never need the ring beyond l - 1 tokens
    torch.testing.assert_close(feed(layer, x, cache, chunks), layer(x), rtol=1e-10, atol=1e-10)


def test_rows_of_different_lengths_decode_independently():
    layer = make_layer()
    lens, steps = [45, 23, 3], 12
    rows = [randn(1, n + steps, HIDDEN, seed=b) for b, n in enumerate(lens)]
    prompts = torch.zeros(3, max(lens), HIDDEN, dtype=torch.float64) + 7.0  # padding: must not matter
    for b, n in enumerate(lens):
        prompts[b, :n] = rows[b][0, :n]
    cache = layer.new_cache(3, max(lens) + steps)
    y_prompt = layer.prefill(prompts, cache, prompt_lens=lens)
    assert cache.host_seqlens == lens
    y_steps = torch.cat([layer.step(torch.cat([r[:, n + s:n + s + 1] for r, n in zip(rows, lens)]), cache)
                         for s in range(steps)], dim=1)
    for b, n in enumerate(lens):
        alone = layer(rows[b])[0]  # row b run by itself
        torch.testing.assert_close(y_prompt[b, :n], alone[:n], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(y_steps[b], alone[n:], rtol=1e-10, atol=1e-10)


def test_trim_then_restep_equals_never_having_stepped():
    layer = make_layer()
    x, draft = randn(2, 60, HIDDEN), randn(2, 6, HIDDEN, seed=9)
    cache, fresh = layer.new_cache(2, 80), layer.new_cache(2, 80)
    layer.prefill(x[:, :38], cache)
    layer.step(draft, cache)  # 6 speculative tokens: positions 38..43 complete compressed tokens 8, 9 ([32, 40), [36, 44))
    assert cache.k_cmp.shape[1] > CFG.num_cmp_tokens(44) > CFG.num_cmp_tokens(38)
    cache.trim(38)  # rejected: the compressed token made from them must go too
    assert cache.host_seqlens == [38, 38]
    # one token at a time first, so that the op reads the slots of compressed tokens 8, 9 before they are remade
    y = torch.cat([layer.step(x[:, t:t + 1], cache) for t in range(38, 45)] + [layer.step(x[:, 45:], cache)], dim=1)
    torch.testing.assert_close(y, feed(layer, x, fresh, [38, 22])[:, 38:], rtol=1e-12, atol=1e-12)


def test_trim_limits_and_reset():
    layer = make_layer()
    x = randn(1, 60, HIDDEN)
    cache = layer.new_cache(1, 60, max_trim=4)  # the ring keeps l - 1 + 4 raw compression tokens
    layer.prefill(x[:, :30], cache)
    layer.step(x[:, 30:50], cache)
    with pytest.raises(ValueError, match="max_trim >= 20"):
        cache.trim(30)
    assert cache.host_seqlens == [50]  # a refused trim changes nothing
    cache.trim(46)
    cache.trim(0)  # rolling a row back to empty always works
    cache.reset()
    assert cache.is_empty
    torch.testing.assert_close(layer.prefill(x[:, :10], cache), layer(x[:, :10]))


def test_bad_input_raises_clear_errors():
    layer = make_layer()
    x = randn(2, 10, HIDDEN)
    cache = layer.new_cache(2, 12)
    layer.prefill(x, cache)
    with pytest.raises(ValueError, match=r"capacity \(12 tokens\).*needs 13"):
        layer.step(x[:, :3], cache)
    with pytest.raises(ValueError, match="batch 1 but the cache was created for batch 2"):
        layer.step(x[:1, :1], cache)
    with pytest.raises(TypeError, match="dtype torch.float64 but the cache holds torch.float32"):
        layer.step(x[:, :1], layer.new_cache(2, 12, dtype=torch.float32))
    with pytest.raises(ValueError, match="another config"):
        layer.step(x[:, :1], make_layer(share_kv=True).new_cache(2, 12))
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        layer.new_cache(2, 0)
    with pytest.raises(ValueError, match="prompt_lens must hold 2 prompt lengths"):
        layer.prefill(x, cache, prompt_lens=[3, 11])
    assert cache.host_seqlens == [10, 10]  # nothing was written by the refused calls


@pytest.mark.parametrize("share_kv", [False, True])
def test_nbytes_formula(share_kv):
    layer = make_layer(share_kv)
    B, cap, Hkv, Dk, Dv = 3, 100, 2, 8, 6
    cache = layer.new_cache(B, cap, max_trim=5)
    sets = 1 if share_kv else 2
    tokens = sets * cap + CFG.num_cmp_tokens(cap) + 1 + CFG.cmp_block - 1 + 5  # + 1: the spare compressed slot
    assert cache.nbytes == B * 8 * Hkv * (Dk + Dv) * tokens + 4 * B + 4 + 2 * Dk  # error_flag, rope_inv_freq


@pytest.mark.parametrize("share_kv", [False, True])
def test_grown_cache_decodes_as_one_made_large(share_kv):
    """Growing a cache mid-decoding (past compressed tokens, selection blocks and the window) keeps every row's
    contents: the steps after it equal those of a cache made with the final capacity."""
    layer = make_layer(share_kv)
    x = randn(2, T, HIDDEN)
    small, large = layer.new_cache(2, 12), layer.new_cache(2, T)
    want = feed(layer, x, large, [11, 1, 1, 57])
    ys = [layer.prefill(x[:, :11], small), layer.step(x[:, 11:12], small)]
    small.grow(13)  # by one token, then past many compressed tokens
    ys.append(layer.step(x[:, 12:13], small))
    small.grow(T)
    ys.append(layer.step(x[:, 13:], small))
    assert small.capacity == T and small.cmp_capacity == CFG.num_cmp_tokens(T) and small.k_cmp.shape[1] == small.cmp_capacity
    assert (small.k_swa is small.k_slc) == share_kv
    torch.testing.assert_close(torch.cat(ys, dim=1), want, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="capacity must be an int >= the current capacity"):
        small.grow(T - 1)


def test_model_cache_grow_reaches_every_layer():
    torch.manual_seed(0)
    model = nsa.LanguageModel(nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attention="full"))
    cache = model.new_cache(1, 4)
    cache.grow(9)
    assert cache.capacity == 9 and all(c.k.shape[1] == 9 and c.v.shape[1] == 9 for c in cache.layers)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_model_cache_rows_of_different_lengths(attention):
    torch.manual_seed(0)
    model = nsa.LanguageModel(nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attention=attention,
                                              nsa=CFG, backend="reference")).double()
    lens, steps = [30, 9], 8
    seqs = [torch.randint(0, 256, (1, n + steps)) for n in lens]
    prompts = torch.zeros(2, max(lens), dtype=torch.long)
    for b, n in enumerate(lens):
        prompts[b, :n] = seqs[b][0, :n]
    cache = model.new_cache(2, max(lens) + steps)
    assert isinstance(cache, ModelCache)
    assert all(isinstance(c, NSACache if attention == "nsa" else KVCache) for c in cache.layers)
    model(prompts, cache=cache, prompt_lens=lens)
    logits = torch.cat([model(torch.cat([s[:, n + i:n + i + 1] for s, n in zip(seqs, lens)]), cache=cache)[0]
                        for i in range(steps)], dim=1)
    for b, n in enumerate(lens):
        torch.testing.assert_close(logits[b], model(seqs[b])[0][0, n:], rtol=1e-10, atol=1e-10)
    cache.trim([36, 15])  # the container rolls every layer back
    assert all(c.host_seqlens == [36, 15] for c in cache.layers)
    with pytest.raises(ValueError, match="prompt_lens is for prefill"):
        model(prompts[:, :1], cache=cache, prompt_lens=lens)


@pytest.mark.gpu
def test_cache_on_cuda_by_name_takes_inputs_on_cuda_0():
    """A cache created with device="cuda" accepts inputs on torch.device("cuda", current index)."""
    layer = make_layer().cuda()
    cache = layer.new_cache(1, T, device="cuda")
    x = randn(1, 20, HIDDEN).cuda()
    assert x.device == cache.device == torch.device("cuda", torch.cuda.current_device())
    layer.prefill(x[:, :19], cache)
    layer.step(x[:, 19:], cache)


@pytest.mark.parametrize("new_len", [5.0, True, [5, 5.0], [5], "5", torch.tensor(5), [-1, 3], None])
def test_trim_rejects_what_is_not_an_int_length(new_len):
    layer = make_layer()
    cache = layer.new_cache(2, 12)
    layer.prefill(randn(2, 10, HIDDEN), cache)
    with pytest.raises(ValueError, match="new_len must be a non-negative int"):
        cache.trim(new_len)
    assert cache.host_seqlens == [10, 10]


@pytest.mark.parametrize("rows", [[-1], [2], [True], [0.0], 0, "0", torch.tensor([0])])
def test_reset_rejects_rows_out_of_range_or_not_ints(rows):
    layer = make_layer()
    cache = layer.new_cache(2, 12)
    layer.prefill(randn(2, 10, HIDDEN), cache)
    with pytest.raises(ValueError, match=r"rows must be None or a list of row indices in \[0, 2\)"):
        cache.reset(rows)
    assert cache.host_seqlens == [10, 10]


def test_cache_arguments_accept_numpy_ints():
    np = pytest.importorskip("numpy")
    layer = make_layer()
    cache = layer.new_cache(np.int64(2), np.int32(12), max_trim=np.int64(4))
    assert (cache.batch_size, cache.capacity, cache.max_trim) == (2, 12, 4)
    layer.prefill(randn(2, 10, HIDDEN), cache)
    cache.trim(np.int64(8))
    cache.trim([np.int32(7), 6])
    assert cache.host_seqlens == [7, 6]
    cache.reset(np.array([1]))
    assert cache.host_seqlens == [7, 0]
    model_cache = ModelCache([cache])
    with pytest.raises(ValueError, match="new_len"):
        model_cache.trim(2.5)


def test_step_checks_the_host_lengths_and_passes_the_error_flag(monkeypatch):
    """A step hands nsa_decode_attention the cache's host lengths (no device read) and its error flag; a set flag
    makes ModelCache.check_decode_errors raise until reset()."""
    model = nsa.LanguageModel(nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, nsa=CFG,
                                              backend="reference")).double()
    cache = model.new_cache(2, 30)
    model(torch.zeros(2, 12, dtype=torch.long), cache=cache)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return decode_attention(*args, **kwargs)

    decode_attention = nsa.layer.nsa_decode_attention
    monkeypatch.setattr(nsa.layer, "nsa_decode_attention", spy)
    model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    assert [kw["host_seqlens"] for kw in seen] == [[13, 13]] * 2
    assert [kw["error_flag"] for kw in seen] == [c.error_flag for c in cache.layers]
    cache.check_decode_errors()
    cache.layers[1].error_flag.fill_(1)
    with pytest.raises(RuntimeError, match="length is out of range"):
        cache.check_decode_errors()
    cache.reset()
    cache.check_decode_errors()


def test_layers_make_their_caches_from_plain_sizes():
    """Each attention layer's new_cache passes its sizes to the cache constructor (which reads no layer)."""
    layer = make_layer(share_kv=True)
    cache = layer.new_cache(2, 20, max_trim=3)
    plain = NSACache(CFG, 2, 20, 2, 8, 6, True, torch.float64, "cpu", max_trim=3, rope_base=layer.rope_base)
    assert (cache.k_slc.shape, cache.v_cmp.shape, cache.ring_v.shape, cache.nbytes) == \
        (plain.k_slc.shape, plain.v_cmp.shape, plain.ring_v.shape, plain.nbytes)
    assert layer.new_cache(1, 4, dtype=torch.float16).dtype == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.new_cache(1, 4).dtype == torch.bfloat16
    model = nsa.LanguageModel(nsa.ModelConfig(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, attention="full"))
    kv = model.blocks[0].attn.new_cache(3, 16)
    assert isinstance(kv, KVCache) and kv.k.shape == (3, 16, 2, 8) and kv.dtype == torch.float32


def test_host_seqlens_kept_restores_the_host_mirror_only():
    """What DecodeGraph wraps around a capture: the host side of a step runs, cache_seqlens stays put."""
    model = nsa.LanguageModel(nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, nsa=CFG,
                                              backend="reference"))
    cache = model.new_cache(2, 20)
    model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    with pytest.raises(RuntimeError, match="boom"), cache.host_seqlens_kept():
        for c in cache.layers:
            c.advance_host(3)
        raise RuntimeError("boom")
    assert all(c.host_seqlens == [5, 5] and c.cache_seqlens.tolist() == [5, 5] for c in cache.layers)
    cache.advance_host(2)  # after a replayed step, whose device part advanced cache_seqlens
    assert all(c.host_seqlens == [7, 7] for c in cache.layers)
    with pytest.raises(ValueError, match=r"capacity \(20 tokens\)"):
        cache.check_new(torch.zeros(2, 14), 14)


def test_cache_with_one_token_blocks_and_no_trim():
    """Regression (tests/test_properties.py): cmp_block=1 with max_trim=0 made a ring of 0 slots, and the first
    step divided by zero (positions % ring_size)."""
    config = NSAConfig(cmp_block=1, cmp_stride=1, slc_block=1, num_selected=1, window=1)
    torch.manual_seed(0)
    layer = NativeSparseAttention(HIDDEN, 2, 1, 8, config=config, backend="reference").double()
    x = randn(1, 6, HIDDEN)
    cache = layer.new_cache(1, 6, max_trim=0)
    torch.testing.assert_close(feed(layer, x, cache, [1, 1, 4]), layer(x), rtol=1e-10, atol=1e-10)


def test_trims_add_up_until_the_ring_is_refilled():
    """Regression: trim(8) from 10, one step, trim(7) (2 tokens each, within max_trim=2) rolled back 3 tokens past
    the cmp_src ring, and the next step remade compressed token [4, 8) from a stale slot (outputs off by ~1)."""
    config = NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, window=4)
    torch.manual_seed(0)
    layer = NativeSparseAttention(HIDDEN, 2, 1, 8, config=config, backend="reference").double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = randn(1, 12, HIDDEN)
    cache = layer.new_cache(1, 16, max_trim=2)  # ring of l - 1 + 2 = 5 positions
    layer.prefill(x[:, :10], cache)
    cache.trim(8)
    layer.step(x[:, 8:9], cache)
    with pytest.raises(ValueError, match="max_trim >= 3"):
        cache.trim(7)
    assert cache.host_seqlens == [9]
    cache.trim(8)  # 2 from the longest state: fine
    torch.testing.assert_close(layer.step(x[:, 8:12], cache), layer(x)[:, 8:12], rtol=1e-10, atol=1e-10)
    cache.trim(10)  # the ring now holds positions 7..11 again
    torch.testing.assert_close(layer.step(x[:, 10:11], cache), layer(x[:, :11])[:, 10:11], rtol=1e-10, atol=1e-10)


def test_reset_rows_start_their_ring_over():
    """Regression: a reset row kept the ring start of its earlier, longer history, so a trim within max_trim of
    its new history was refused (two reset() methods, one shadowing the other)."""
    config = NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, num_selected=2, window=4)
    torch.manual_seed(0)
    layer = NativeSparseAttention(HIDDEN, 2, 1, 8, config=config, backend="reference").double()
    x = randn(1, 12, HIDDEN)
    cache = layer.new_cache(1, 16, max_trim=2)
    layer.prefill(randn(1, 10, HIDDEN), cache)
    cache.error_flag.fill_(1)
    cache.reset()
    assert cache.error_flag.item() == 0
    for t in range(3):
        layer.step(x[:, t:t + 1], cache)
    cache.trim(1)
    torch.testing.assert_close(layer.step(x[:, 1:4], cache), layer(x[:, :4])[:, 1:4], rtol=1e-10, atol=1e-10)
