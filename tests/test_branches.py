"""The branch ablations: gates of branches left out are exactly 0, of ungated ones exactly 1; window-only ignores keys
beyond the window."""
import pytest
import torch

from nsa import LanguageModel, ModelConfig, NativeSparseAttention, NSAConfig
from nsa.train import config_dict, configs_from_dict, TrainConfig

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, num_selected=2, window=8)


def layer(branches, share_kv=False, ungated=()):
    torch.manual_seed(0)
    return NativeSparseAttention(32, 4, 2, 8, config=CFG, backend="reference", branches=branches,
                                 share_kv=share_kv, ungated=ungated).double()


@pytest.mark.parametrize("share_kv", [False, True])
def test_window_only_outputs_ignore_keys_beyond_the_window(share_kv):
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 5] += 1.0  # token 5 is inside the window of queries 5 .. 5 + w - 1 = 12 only
    window_only, full = layer(["swa"], share_kv), layer(("cmp", "slc", "swa"), share_kv)
    a, b = window_only(x), window_only(changed)
    assert torch.equal(a[:, 13:], b[:, 13:])  # bitwise: the other branches' gates are exactly 0
    assert not torch.allclose(a[:, 5:13], b[:, 5:13])
    assert not torch.allclose(full(x)[:, 13:], full(changed)[:, 13:])  # NSA reaches beyond the window
    gates = window_only.nsa_inputs(x).gates
    assert (gates[..., :2] == 0).all() and (gates[..., 2] > 0).all()


def test_window_only_model_decodes_like_the_full_sequence_and_round_trips_its_config():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, nsa=CFG, backend="reference", branches=["swa"])
    assert cfg.branches == ("swa",)
    model = LanguageModel(cfg)
    prompt = torch.randint(0, 256, (1, 20))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0,
                                                                                use_cache=False))
    again, _ = configs_from_dict(config_dict(cfg, TrainConfig()))
    assert again == cfg


@pytest.mark.parametrize("branches", [(), ["swa", "full"], "swa"])
def test_bad_branches(branches):
    with pytest.raises(ValueError, match="branches"):
        ModelConfig(branches=branches)


def test_ungated_branch_weighs_exactly_one_and_its_gate_weights_get_no_gradient():
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    ungated = layer(("cmp", "slc", "swa"), ungated=["cmp"])
    gates = ungated.nsa_inputs(x).gates
    assert (gates[..., 0] == 1).all() and ((gates[..., 1:] > 0) & (gates[..., 1:] < 1)).all()
    learned = layer(("cmp", "slc", "swa"))  # same seed: same weights
    assert torch.equal(learned.nsa_inputs(x).gates[..., 1:], gates[..., 1:])
    ungated(x).sum().backward()
    grad = ungated.gate_proj.weight.grad.view(4, 3, 32)  # rows: head-major, then (cmp, slc, swa)
    assert (grad[:, 0] == 0).all() and (grad[:, 1:] != 0).any()


def test_ungated_model_decodes_like_the_full_sequence_and_round_trips_its_config():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, nsa=CFG, backend="reference", ungated=["cmp"])
    assert cfg.ungated == ("cmp",)
    model = LanguageModel(cfg)
    prompt = torch.randint(0, 256, (1, 20))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0,
                                                                                use_cache=False))
    again, _ = configs_from_dict(config_dict(cfg, TrainConfig()))
    assert again == cfg


@pytest.mark.parametrize("branches, ungated", [(("cmp", "slc", "swa"), "cmp"), (("swa",), ["cmp"]),
                                               (("cmp", "slc", "swa"), ["gate"])])
def test_bad_ungated(branches, ungated):
    with pytest.raises(ValueError, match="ungated"):
        ModelConfig(branches=branches, ungated=ungated)
