"""experiments/key_ablation.py: the prompts carry their answer where the scorer reads it, each ablation removes
exactly what its name says, the layer gets its own method back, and the script runs end to end on a tiny
checkpoint (its figures are in EXPERIMENTS.md)."""
import importlib.util
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from nsa import LanguageModel, ModelConfig, NSAConfig
from nsa.checkpoint import save_checkpoint
from nsa.data import encode
from nsa.eval import KEY_DIGITS
from nsa.train import TrainConfig, config_dict

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("key_ablation", ROOT / "experiments" / "key_ablation.py")
key_ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(key_ablation)

FILLER = encode("".join(f"line {i} of some filler text\n" for i in range(100)))
CFG = ModelConfig(n_layer=2, n_embd=16, n_head=2, n_kv_head=1, backend="reference",
                  nsa=NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=2, window=16))


def test_prompts_end_with_the_answer_whose_digits_are_the_key():
    idx, key_pos, first = key_ablation.teacher_forced_prompts(FILLER, 120, [0.2, 0.8], 3, random.Random(0))
    assert idx.shape[0] == key_pos.shape[0] == 6 and key_pos.shape[1] == KEY_DIGITS
    for row, pos in zip(idx, key_pos):
        key = bytes(row[pos].tolist()).decode()
        assert key.isdigit() and bytes(row[first:first + KEY_DIGITS].tolist()).decode() == key
        assert bytes(row[first - 1:first].tolist()) == b" " and first == 121


def test_each_ablation_removes_what_it_names():
    torch.manual_seed(0)
    model = LanguageModel(CFG)
    layer = model.blocks[0].attn
    idx, key_pos, _ = key_ablation.teacher_forced_prompts(FILLER, 120, [0.5], 2, random.Random(1))
    inputs = layer.nsa_inputs(model.embed(idx))
    c = layer.config
    starts = torch.arange(inputs.v_cmp.shape[1]) * c.cmp_stride
    covers = ((starts[None, :, None] <= key_pos[:, None]) & (key_pos[:, None] < starts[None, :, None] + c.cmp_block)
              ).any(-1)  # [B, Tc]
    key = key_ablation.ablation("cmp-key", key_pos)(layer, inputs)
    rest = key_ablation.ablation("cmp-rest", key_pos)(layer, inputs)
    assert covers.any() and (~covers).any()
    assert (key.v_cmp[covers] == 0).all() and torch.equal(key.v_cmp[~covers], inputs.v_cmp[~covers])
    assert (rest.v_cmp[~covers] == 0).all() and torch.equal(rest.v_cmp[covers], inputs.v_cmp[covers])
    assert torch.equal(key.k_cmp, inputs.k_cmp) and torch.equal(key.gates, inputs.gates)  # weights, selection kept
    slc = key_ablation.ablation("slc-key", key_pos)(layer, inputs)
    in_key_block = torch.zeros(idx.shape, dtype=torch.bool)
    for b, pos in enumerate(key_pos):
        for blk in (pos // c.slc_block).tolist():
            in_key_block[b, blk * c.slc_block:(blk + 1) * c.slc_block] = True
    assert (slc.v_slc[in_key_block] == 0).all() and torch.equal(slc.v_slc[~in_key_block], inputs.v_slc[~in_key_block])
    for i, branch in enumerate(("cmp", "slc", "swa")):
        gated = key_ablation.ablation(f"gate-{branch}", key_pos)(layer, inputs)
        assert (gated.gates[..., i] == 0).all() and (inputs.gates[..., i] > 0).all()
        assert torch.equal(gated.gates[..., [j for j in range(3) if j != i]],
                           inputs.gates[..., [j for j in range(3) if j != i]])


def test_the_edit_reaches_the_layer_and_is_undone():
    torch.manual_seed(0)
    model = LanguageModel(CFG).eval()
    idx, key_pos, first = key_ablation.teacher_forced_prompts(FILLER, 120, [0.5], 2, random.Random(2))
    layer, calls = model.blocks[1].attn, []

    def edit(l, inputs):
        calls.append(l)
        return key_ablation.ablation("gate-swa", key_pos)(l, inputs)
    before = key_ablation.digits_right(model, idx, first)
    score = key_ablation.digits_right(model, idx, first, edit, layer)
    assert calls == [layer] and 0 <= score <= 1 and 0 <= before <= 1
    assert "nsa_inputs" not in vars(layer)  # the class's method again
    assert key_ablation.digits_right(model, idx, first) == before


def test_runs_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    data = tmp_path / "text.txt"
    data.write_text(bytes(FILLER.tolist()).decode())
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint.safetensors", LanguageModel(CFG), step=0,
                    config=config_dict(CFG, TrainConfig(data=str(data))))
    out = tmp_path / "ablation.json"
    results = key_ablation.main([str(run), "--lengths", "100,140", "--depths", "0.5", "--trials", "2",
                                 "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    assert len(results["none"]) == 2 and len(results["layers"]) == 2
    assert all(set(layer) == set(key_ablation.ABLATIONS) for layer in results["layers"])
    assert all(0 <= v <= 1 for layer in results["layers"] for values in layer.values() for v in values)
    assert "| 1 | cmp-key |" in capsys.readouterr().out
    full, full_cfg = tmp_path / "full", replace(CFG, attention="full")
    save_checkpoint(full / "checkpoint.safetensors", LanguageModel(full_cfg), step=0,
                    config=config_dict(full_cfg, TrainConfig(data=str(data))))
    with pytest.raises(SystemExit, match="no NSA layer"):
        key_ablation.main([str(full), "--device", "cpu"])
