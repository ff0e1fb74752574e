"""experiments/: the configs are valid and the sizes the issue asks for, EXPERIMENTS.md lists exactly the commands
experiments/run.py runs, and the whole pipeline runs at tiny size on the CPU."""
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")

from nsa.cli import read_config_file
from nsa.train import PRESETS, apply_overrides, build_configs

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("experiments_run", ROOT / "experiments" / "run.py")
experiments = sys.modules["experiments_run"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(experiments)


def configs(name):
    config = apply_overrides(PRESETS["tiny"], read_config_file(ROOT / "experiments" / name))  # as `nsa train` does
    return build_configs(config)


def test_configs_are_the_issues_sizes():
    (loss_model, loss_train), (ret_model, ret_train) = configs("loss-8k.toml"), configs("retrieval-8k.toml")
    assert loss_model == ret_model  # the same model in both experiments
    assert loss_train.seq_len == ret_train.seq_len == 8192 and loss_model.nsa.window == 512
    assert loss_model.n_head // loss_model.n_kv_head >= 4 and loss_model.head_dim in (64, 128)
    assert 4 <= loss_model.n_layer <= 6 and 512 <= loss_model.n_embd <= 768
    assert loss_train.data == ret_train.data == "python-env"
    assert loss_train.passkey_fraction == 0 < ret_train.passkey_fraction
    used = {e.config for e in experiments.EXPERIMENTS.values()} - {None}
    assert used == {"loss-8k.toml", "retrieval-8k.toml"}


def test_experiments_md_lists_the_commands_run_py_runs():
    text = (ROOT / "EXPERIMENTS.md").read_text()
    for name in experiments.EXPERIMENTS:
        assert f"python experiments/run.py {name} results" in text
        for _, argv in experiments.commands(name, Path("results")):
            assert shlex.join(argv) in text, shlex.join(argv)


def test_tiny_retrieval_then_learned_run_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(FileNotFoundError, match="run `python experiments/run.py retrieval"):
        experiments.main(["learned", str(tmp_path), "--tiny"])
    assert experiments.main(["retrieval", str(tmp_path), "--tiny"]) == 0
    summary = json.loads((tmp_path / "retrieval" / "summary.json").read_text())
    assert list(summary["models"]) == ["nsa", "full", "swa", "nsa-ungated"]
    for name, entry in summary["models"].items():
        assert math.isfinite(entry["final_val_loss"]) and entry["median_ms_per_step"] > 0
        assert all(0 <= a <= 1 for a in entry["accuracy_by_length"].values())
        grid = entry["accuracy"]  # the whole grid, as passkey.json has it
        passkey = json.loads((tmp_path / "retrieval" / name / "passkey" / "passkey.json").read_text())
        assert grid == {"depths": passkey["depths"], **{str(n): row for n, row in zip(passkey["lengths"],
                                                                                     passkey["accuracy"])}}
        assert ("nsa_layers" in entry) == (name != "full")
        train = json.loads((tmp_path / "retrieval" / name / "config.json").read_text())["train"]
        assert train["steps"] == experiments.TINY_STEPS and train["passkey_fraction"] > 0
        assert (tmp_path / "retrieval" / name / "passkey" / "passkey.png").exists()
        for r in entry["repeat_loss_by_length"].values():
            assert math.isfinite(r["first"]) and math.isfinite(r["second"])
            assert (len(r["nsa_layers"]) > 0) == (name != "full")  # the selection's hits on the block to copy from
        assert ("key_ablation" in entry) == (name in ("nsa", "nsa-ungated"))  # the models with cmp and slc on
    for name in ("nsa", "nsa-ungated"):
        ablation = summary["models"][name]["key_ablation"]
        assert ablation == {k: v for k, v in json.loads((tmp_path / "retrieval" / name / "key_ablation.json")
                                                         .read_text()).items() if k in ("lengths", "none", "layers")}
        assert len(ablation["layers"]) == 2 and len(ablation["none"]) == len(ablation["lengths"])
    assert summary["models"]["swa"]["nsa_layers"][0]["gate_mean"]["cmp"] == 0
    assert (tmp_path / "retrieval" / "loss.png").exists()
    assert experiments.main(["learned", str(tmp_path), "--tiny"]) == 0
    learned = json.loads((tmp_path / "learned" / "summary.json").read_text())
    assert list(learned["models"]) == ["nsa", "swa", "nsa-ungated"]
    assert all(0 <= s["hit_rate"] <= 1 for entry in learned["models"].values() for s in entry["nsa_layers"])
    printed = capsys.readouterr().out
    for _, argv in experiments.commands("learned", tmp_path, tiny=True):
        assert "$ " + shlex.join(argv) in printed


def test_models_picks_a_subset_in_the_experiments_order():
    labels = [label for label, _ in experiments.commands("retrieval", Path("r"), models=["swa", "nsa"])]
    assert labels == ["train nsa", "train swa", "eval nsa", "eval swa", "repeat nsa", "repeat swa", "ablate nsa", "plot"]
    with pytest.raises(ValueError, match=r"--models: retrieval has the models \['nsa', 'full', 'swa', 'nsa-ungated'\]"):
        experiments.commands("retrieval", Path("r"), models=["dense"])


def test_set_reaches_every_training_run_after_the_models_own_overrides():
    steps = experiments.commands("retrieval", Path("r"), models=["swa", "nsa-ungated"], overrides=["train.steps=2400"])
    trains = [argv for label, argv in steps if label.startswith("train")]
    assert [argv[argv.index("--set", 6):] for argv in trains] == [
        ["--set", 'model.branches=["swa"]', "--set", "train.steps=2400"],
        ["--set", 'model.ungated=["cmp"]', "--set", "train.steps=2400"]]
    with pytest.raises(ValueError, match="--set: learned trains nothing"):
        experiments.commands("learned", Path("r"), overrides=["train.steps=2400"])
