"""LanguageModel.generate: the same tokens with and without the KV cache and with and without a CUDA graph of the
decoding step; stop tokens, callback, nucleus."""
import pytest
import torch

import nsa
from nsa.graph import DecodeGraph

CFG = nsa.NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=3, window=12)


def make_model(attention, share_kv=False):
    torch.manual_seed(0)
    cfg = nsa.ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attention=attention, nsa=CFG,
                          share_kv=share_kv, backend="reference")
    return nsa.LanguageModel(cfg).double()


PROMPT = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("attention, share_kv", [("nsa", False), ("nsa", True), ("full", False)])
def test_same_tokens_with_and_without_cache(attention, share_kv):
    model = make_model(attention, share_kv)
    # 60 new tokens cross compressed tokens, selection blocks and the window
    greedy = model.generate(PROMPT, 60, temperature=0)
    assert greedy.shape == (3, 70) and torch.equal(greedy[:, :10], PROMPT)
    assert torch.equal(model.generate(PROMPT, 60, temperature=0, use_cache=False), greedy)
    sampled = [model.generate(PROMPT, 60, temperature=1.5, top_p=0.95, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(1)) for use_cache in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy)


def test_stop_tokens_end_rows():
    model = make_model("nsa")
    free = model.generate(PROMPT, 12, temperature=0)
    stop = int(free[0, 13])  # row 0 emits it at its 4th new token (maybe earlier too)
    first = int((free[0, 10:] == stop).nonzero()[0])
    out = model.generate(PROMPT, 12, temperature=0, stop_tokens=[stop])
    assert torch.equal(out[0, :11 + first], free[0, :11 + first])
    assert (out[0, 10 + first:] == stop).all()  # an ended row repeats its stop token
    for b in (1, 2):  # the other rows go on as before up to their own first stop token
        hit = (free[b, 10:] == stop).nonzero()
        end = 10 + (int(hit[0]) + 1 if len(hit) else 12)
        assert torch.equal(out[b, :end], free[b, :end])
    # once every row has ended, generation stops early
    assert model.generate(PROMPT, 12, temperature=0, stop_tokens=range(256)).shape == (3, 11)


def test_callback_receives_every_token():
    model = make_model("nsa")
    seen = []
    out = model.generate(PROMPT, 9, generator=torch.Generator().manual_seed(0), callback=lambda t: seen.append(t))
    assert len(seen) == 9 and torch.equal(torch.stack(seen, dim=1), out[:, 10:])


@pytest.mark.parametrize("use_cache", [True, False])
def test_tiny_nucleus_is_greedy(use_cache):
    model = make_model("nsa")
    greedy = model.generate(PROMPT, 20, temperature=0, use_cache=use_cache)
    nucleus = model.generate(PROMPT, 20, top_p=1e-9, use_cache=use_cache, generator=torch.Generator().manual_seed(3))
    assert torch.equal(nucleus, greedy)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_chunked_prefill_equals_one_pass(attention):
    model = make_model(attention)
    idx = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    whole = model.prefill(idx, model.new_cache(2, 50))
    torch.testing.assert_close(model.prefill(idx, model.new_cache(2, 50), chunk_size=16), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whole, model(idx)[0], rtol=1e-10, atol=1e-10)


def test_cuda_graph_needs_a_cache_on_a_gpu():
    model = make_model("nsa")
    with pytest.raises(ValueError, match="cuda_graph=True needs use_cache=True and CUDA inputs"):
        model.generate(PROMPT, 4, cuda_graph=True)
    cache = model.new_cache(3, 20)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraph(model, cache)


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_cuda_graph_gives_the_same_tokens(attention):
    torch.manual_seed(0)
    cfg = nsa.ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, attention=attention, nsa=CFG)
    model = nsa.LanguageModel(cfg).to("cuda", torch.bfloat16).eval()
    prompt = PROMPT.cuda().repeat(1, 9)  # 90 tokens; 50 new ones cross compressed tokens and selection blocks
    eager = model.generate(prompt, 50, temperature=0, cuda_graph=False)
    assert torch.equal(model.generate(prompt, 50, temperature=0, cuda_graph=True), eager)
    sampled = [model.generate(prompt, 50, temperature=1.5, top_p=0.95, cuda_graph=graph,
                              generator=torch.Generator("cuda").manual_seed(1)) for graph in (False, True)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], eager)


@pytest.mark.gpu
def test_cuda_graph_capture_failure_warns_and_decodes_eagerly():
    model = make_model("nsa").cuda()  # the reference backend reads lengths on the host: not capturable
    prompt = PROMPT.cuda()
    with pytest.warns(UserWarning, match="could not capture the decoding step"):
        out = model.generate(prompt, 6, temperature=0)
    assert torch.equal(out, model.generate(prompt, 6, temperature=0, cuda_graph=False))


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(temperature=-1), ValueError, ["temperature", ">= 0"]),  # used to sample the inverted distribution
    (dict(temperature=float("nan")), ValueError, ["temperature"]),
    (dict(temperature=float("inf")), ValueError, ["temperature", "finite"]),
    (dict(temperature=True), ValueError, ["temperature"]),
    (dict(temperature="0.5"), ValueError, ["temperature"]),
    (dict(top_p=0), ValueError, ["top_p", "(0, 1]"]),
    (dict(top_p=1.5), ValueError, ["top_p", "(0, 1]"]),
    (dict(top_p=float("nan")), ValueError, ["top_p"]),
    (dict(max_new_tokens=-1), ValueError, ["max_new_tokens", "non-negative int"]),
    (dict(max_new_tokens=2.0), ValueError, ["max_new_tokens", "non-negative int"]),
    (dict(max_new_tokens=True), ValueError, ["max_new_tokens"]),
    (dict(stop_tokens=[256]), ValueError, ["stop_tokens", "[0, 256)"]),
    (dict(stop_tokens=[-1]), ValueError, ["stop_tokens", "[0, 256)"]),
    (dict(stop_tokens=[1.0]), ValueError, ["stop_tokens"]),
    (dict(stop_tokens=5), TypeError, ["stop_tokens", "iterable"]),
    (dict(stop_tokens="\n"), TypeError, ["stop_tokens", "iterable"]),
    (dict(callback=3), TypeError, ["callback", "callable"]),
])
def test_generate_rejects_bad_sampling_arguments(kwargs, error, words):
    model = make_model("nsa")
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error) as info:
        model.generate(PROMPT, **args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("prompt, error, words", [
    (torch.tensor([1, 2, 3]), ValueError, ["[B, T]", "idx[None]"]),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, ["[B, T]", "T >= 1"]),
    (torch.zeros(0, 4, dtype=torch.long), ValueError, ["[B, T]"]),
    (torch.tensor([[1, 256]]), ValueError, ["idx", "[0, 256)", "256"]),
    (torch.tensor([[-1, 2]]), ValueError, ["idx", "[0, 256)", "-1"]),
    (torch.tensor([[1.0, 2.0]]), TypeError, ["idx", "int64"]),
    ([[1, 2]], TypeError, ["idx", "tensor"]),
])
def test_generate_and_prefill_reject_bad_prompts(prompt, error, words):
    model = make_model("nsa")
    for call in (lambda: model.generate(prompt, 2), lambda: model.prefill(prompt, model.new_cache(1, 8))):
        with pytest.raises(error) as info:
            call()
        for word in words:
            assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_prefill_rejects_bad_chunk_size(chunk_size):
    model = make_model("nsa")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        model.prefill(PROMPT, model.new_cache(3, 10), chunk_size=chunk_size)


def test_sample_rejects_bad_arguments():
    logits = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        nsa.model.sample(logits, -1.0)
    with pytest.raises(ValueError, match="top_p"):
        nsa.model.sample(logits, 1.0, top_p=2)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    model = make_model("nsa")
    expected = model.generate(PROMPT, 5, temperature=0, stop_tokens=[7])
    out = model.generate(PROMPT, np.int64(5), temperature=np.float64(0), top_p=np.float32(0.9),
                         stop_tokens=np.array([7]))
    assert torch.equal(out, expected)
    sampled = model.generate(PROMPT, np.int32(4), temperature=np.float32(0.7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, model.generate(PROMPT, 4, temperature=0.7, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(model.prefill(PROMPT, model.new_cache(3, 10), chunk_size=np.int64(4)),
                               model.prefill(PROMPT, model.new_cache(3, 10), chunk_size=4))


def test_zero_new_tokens_returns_the_prompt():
    assert torch.equal(make_model("nsa").generate(PROMPT, 0), PROMPT)


def test_generate_raises_when_a_step_flags_a_length_out_of_range(monkeypatch):
    """A decoding step that found a row out of range on the device (its outputs NaN, error_flag set) makes
    generate() raise once it reads the flags at the end."""
    model = make_model("nsa")
    decode_attention = nsa.layer.nsa_decode_attention

    def flagging(*args, **kwargs):
        kwargs["error_flag"].fill_(1)
        return decode_attention(*args, **kwargs)

    monkeypatch.setattr(nsa.layer, "nsa_decode_attention", flagging)
    with pytest.raises(RuntimeError, match="length is out of range"):
        model.generate(PROMPT, 3, temperature=0)


@pytest.mark.gpu
def test_cuda_graph_replay_flags_a_device_length_out_of_range():
    """Replays check nothing on the host: a row whose device length went out of range behind the host mirror
    gets NaN logits, the other rows are unchanged, and the caches' error flags are set."""
    torch.manual_seed(0)
    cfg = nsa.ModelConfig(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, nsa=CFG)
    model = nsa.LanguageModel(cfg).to("cuda", torch.float16).eval()
    prompt = PROMPT.cuda().repeat(1, 3)
    cache = model.new_cache(3, 60)
    with torch.no_grad():
        model(prompt, cache=cache)
        model(prompt[:, -1:], cache=cache)
        graph = DecodeGraph(model, cache)
        tokens = prompt[:, -1]
        expected = graph(tokens).clone()
        cache.trim(cache.host_seqlens[0] - 1)
        for layer in cache.layers:
            layer.cache_seqlens[1] = -1  # the step writes slot -1 (the last), then finds length 0 < 1 new token
        logits = graph(tokens)
        assert logits[1].isnan().all() and torch.equal(logits[[0, 2]], expected[[0, 2]])
    with pytest.raises(RuntimeError, match="length is out of range"):
        cache.check_decode_errors()
