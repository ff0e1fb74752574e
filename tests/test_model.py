"""The byte-level LanguageModel with NSA and with full attention."""
import math

import pytest
import torch

from nsa import LanguageModel, ModelConfig, NSAConfig

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8)


def make_model(attention, seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, attention=attention, nsa=CFG,
                      backend="reference" if attention == "nsa" else None, **kwargs)
    return LanguageModel(cfg)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_forward_backward(attention):
    model = make_model(attention)
    idx, targets = torch.randint(0, 256, (2, 2, 40))
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 40, 256)
    assert abs(loss.item() - math.log(256)) < 0.1  # small init: close to uniform over bytes
    assert model(idx)[1] is None
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_causal(attention):
    model = make_model(attention)
    idx = torch.randint(0, 256, (1, 40))
    changed = idx.clone()
    changed[0, 25] = (idx[0, 25] + 1) % 256
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :25], b[:, :25])
    assert not torch.allclose(a[:, 25:], b[:, 25:])


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_packed_sequences_equal_each_sequence_alone(attention):
    model = make_model(attention)
    seqs = [torch.randint(0, 256, (1, n)) for n in (30, 6, 17)]
    cu_seqlens = torch.tensor([0, 30, 36, 53], dtype=torch.int32)
    packed = model(torch.cat(seqs, dim=1), cu_seqlens=cu_seqlens)[0]
    torch.testing.assert_close(packed, torch.cat([model(s)[0] for s in seqs], dim=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_training_steps_lower_the_loss(attention):
    model = make_model(attention)
    idx = torch.randint(0, 256, (2, 41))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("attention", ["nsa", "full"])
def test_generate(attention):
    model = make_model(attention)
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 7, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12) and out.dtype == torch.long
    assert torch.equal(out[:, :5], prompt)
    greedy = model.generate(prompt, 7, temperature=0)
    assert torch.equal(greedy[:, 5], model(prompt)[0][:, -1].argmax(-1))
    # a nucleus this small keeps only the most likely byte: sampling becomes greedy
    assert torch.equal(model.generate(prompt, 7, top_p=1e-6), greedy)


def test_tied_and_untied_lm_head():
    tied, untied = make_model("full"), make_model("full", tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    assert untied.num_params() == tied.num_params() + 256 * 32


@pytest.mark.parametrize("kwargs, name", [({"attention": "linear"}, "attention"),
                                          ({"n_head": 4, "n_kv_head": 3}, "n_kv_head"),
                                          ({"n_embd": 30, "n_head": 4}, "n_embd")])
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("attention", ["nsa", "full"])
@pytest.mark.parametrize("cu_seqlens, error, words", [
    (torch.tensor([0, 10, 24]), TypeError, ["cu_seqlens", "int32"]),
    (torch.tensor([0, 10, 20], dtype=torch.int32), ValueError, ["cu_seqlens", "24"]),
    (torch.tensor([0, 15, 10, 24], dtype=torch.int32), ValueError, ["cu_seqlens", "non-decreasing"]),
    ([0, 10, 24], TypeError, ["cu_seqlens", "Tensor"]),
])
def test_both_attentions_check_cu_seqlens_alike(attention, cu_seqlens, error, words):
    model = make_model(attention)
    with pytest.raises(error) as info:
        model(torch.randint(0, 256, (1, 24)), cu_seqlens=cu_seqlens)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_loss_weights_give_the_weighted_mean_of_the_cross_entropy():
    model = make_model("full")
    idx, targets = torch.randint(0, 256, (2, 2, 40))
    targets[0, 3] = -100
    logits, plain = model(idx, targets)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    w = torch.rand(2, 40) + 0.5
    w[0, 3] = 0.0
    torch.testing.assert_close(model(idx, targets, loss_weights=(targets != -100).float())[1], plain)
    torch.testing.assert_close(model(idx, targets, loss_weights=w)[1], (w.flatten() * ce).sum() / w.sum())
    with pytest.raises(ValueError, match="loss_weights must have the targets' shape"):
        model(idx, targets, loss_weights=w[:, :-1])
