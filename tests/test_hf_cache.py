"""NSAForCausalLM.generate() through NSAHFCache: one prefill, then cached one-token steps, with the same tokens as
nsa's own LanguageModel.generate; left-padded batches; growth past the first capacity; refusals."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import nsa  # noqa: E402
from nsa.hf_cache import NSAHFCache  # noqa: E402
from nsa.hf_model import CACHE_FIELD, NSAConfigHF, NSAForCausalLM  # noqa: E402

NSA = dict(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=12)
PROMPT = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(0))
NEW = 30  # past the first capacity (twice the prompt), compressed tokens, selection blocks and the window


def make_model(attention="nsa", share_kv=False, dtype=torch.float64, device="cpu", backend=None):
    cfg = NSAConfigHF(vocab_size=64, n_layer=2, n_embd=48, n_head=6, n_kv_head=2, head_dim=8, nsa=NSA,
                      attention=attention, share_kv=share_kv, backend=backend)
    torch.manual_seed(0)
    return NSAForCausalLM(cfg).to(dtype=dtype, device=device).eval()


def record_calls(model, monkeypatch) -> list:
    """The shapes of the token ids of every call into the inner LanguageModel, and whether it had a cache."""
    calls, inner = [], type(model.model).forward

    def recording(self, idx, *args, cache=None, **kwargs):
        calls.append((tuple(idx.shape), cache is not None))
        return inner(self, idx, *args, cache=cache, **kwargs)

    monkeypatch.setattr(type(model.model), "forward", recording)
    return calls


@pytest.mark.parametrize("attention, share_kv", [("nsa", False), ("nsa", True), ("full", False)])
def test_greedy_generate_decodes_through_the_cache(attention, share_kv, monkeypatch):
    model = make_model(attention, share_kv)
    want = model.model.generate(PROMPT, NEW, temperature=0)
    calls = record_calls(model, monkeypatch)
    out = model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, want)
    # one prefill of the prompt, then one token per step (the last token is returned, not fed)
    assert calls == [((2, 10), True)] + [((2, 1), True)] * (NEW - 1)
    cache = getattr(out, CACHE_FIELD)
    assert isinstance(cache, NSAHFCache) and cache.model_cache.host_seqlens == [10 + NEW - 1] * 2
    assert cache.model_cache.capacity >= 10 + NEW - 1 > 2 * 10  # grew past its first capacity
    monkeypatch.undo()
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW, do_sample=False, pad_token_id=0, use_cache=False),
                       want)  # re-running whole sequences gives the same tokens


def test_sampled_generate_matches_nsa_generate_under_one_seed():
    model = make_model()
    torch.manual_seed(7)
    want = model.model.generate(PROMPT, NEW, temperature=1.3)
    torch.manual_seed(7)
    got = model.generate(PROMPT, max_new_tokens=NEW, do_sample=True, temperature=1.3, top_k=0, top_p=1.0,
                         pad_token_id=0)
    assert torch.equal(got, want)
    assert not torch.equal(got, model.model.generate(PROMPT, NEW, temperature=0))


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_left_padded_rows_decode_as_alone(attention):
    model = make_model(attention)
    lengths = [10, 3]
    ids = PROMPT.clone()
    mask = torch.ones_like(ids)
    ids[1, :10 - lengths[1]], mask[1, :10 - lengths[1]] = 0, 0  # row 1: 3 tokens, left-padded with id 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for b, n in enumerate(lengths):
        alone = model.model.generate(ids[b:b + 1, 10 - n:], NEW, temperature=0)
        assert torch.equal(out[b, 10:], alone[0, n:]), b


def test_prefill_logits_of_a_left_padded_row_are_its_own():
    model = make_model()
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    with torch.no_grad():
        out = model(PROMPT, attention_mask=mask, use_cache=True)
        alone = model(PROMPT[:1, 3:], use_cache=False).logits
    torch.testing.assert_close(out.logits[0, 3:], alone[0], rtol=1e-10, atol=1e-10)
    assert getattr(out, CACHE_FIELD).model_cache.host_seqlens == [7, 10]


def test_cache_refusals():
    model = make_model()
    right_padded = torch.tensor([[1] * 7 + [0] * 3, [1] * 10])
    with pytest.raises(ValueError, match="padded on the left"):
        model.generate(PROMPT, attention_mask=right_padded, max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(PROMPT, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0)
    with pytest.raises(TypeError, match="NSAHFCache"):
        model(PROMPT, **{CACHE_FIELD: transformers.DynamicCache()})
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        NSAHFCache(capacity=0)
    cache = NSAHFCache(capacity=64)
    with torch.no_grad():
        model(PROMPT, **{CACHE_FIELD: cache})
        assert cache.get_seq_length() == 10 and cache.model_cache.capacity == 64
        with pytest.raises(ValueError, match=r"decoding step must be \[2, 11\]"):
            model(PROMPT[:, :1], attention_mask=torch.ones(2, 10), **{CACHE_FIELD: cache})
        with pytest.raises(ValueError, match="already filled"):
            cache.prefill(model.model, PROMPT, [10, 10])


@pytest.mark.gpu
@pytest.mark.parametrize("share_kv", [False, True])
def test_greedy_generate_triton_matches_nsa_generate(share_kv):
    model = make_model(share_kv=share_kv, dtype=torch.bfloat16, device="cuda", backend="triton")
    prompt = torch.randint(1, 64, (3, 200), generator=torch.Generator().manual_seed(1)).cuda()
    want = model.model.generate(prompt, 150, temperature=0, cuda_graph=False)
    # the capacity nsa's generate allocates: the decoding kernels then split the same lengths the same way
    got = model.generate(prompt, max_new_tokens=150, do_sample=False, pad_token_id=0,
                         **{CACHE_FIELD: NSAHFCache(capacity=350)})
    assert torch.equal(got, want)
