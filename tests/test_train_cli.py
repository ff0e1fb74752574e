"""`nsa train`: presets, settings from flags and files, a tiny run through the CLI, --resume, loss going down."""
import json

import pytest
import torch

pytest.importorskip("safetensors")

from nsa.checkpoint import read_checkpoint
from nsa.cli import main, parse_set
from nsa.train import PRESETS, apply_overrides, build_configs, read_metrics

TEXT = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}  # é\n" for i in range(200))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT)
    return path


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for words in ("--set", "--config", "--resume", "model.nsa:", "checkpoint_every", "metrics.jsonl", "tiny"):
        assert words in out, words


def test_settings_override_in_order_and_derived_fields_follow(tmp_path):
    config = apply_overrides(PRESETS["tiny"], {"model": {"n_embd": 64, "nsa": {"window": 32}}, "train": {"lr": 1}})
    config = apply_overrides(config, parse_set(["model.n_head=8", "train.data=some/folder", "model.share_kv=true",
                                                "train.schedule=constant"]))
    model_cfg, train_cfg = build_configs(config)
    assert (model_cfg.n_embd, model_cfg.n_head, model_cfg.head_dim, model_cfg.nsa.window) == (64, 8, 8, 32)
    assert model_cfg.share_kv is True and train_cfg.lr == 1.0 and isinstance(train_cfg.lr, float)
    assert train_cfg.data == "some/folder" and train_cfg.schedule == "constant"
    with pytest.raises(ValueError, match="model.n_layers"):
        apply_overrides(PRESETS["tiny"], {"model.n_layers": 3})
    with pytest.raises(ValueError, match="optim.lr"):
        apply_overrides(PRESETS["tiny"], {"optim.lr": 3})
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        parse_set(["model.n_layer"])


def tiny_args(run, data, *more):
    return ["train", "--preset", "tiny", "--run", str(run), "--device", "cpu", "--set", f"train.data={data}",
            "--set", "train.steps=6", "--set", "train.checkpoint_every=2", "--set", "train.eval_every=3",
            "--set", "train.seq_len=32", "--set", "train.batch_size=2", "--set", "model.n_layer=1", *more]


def test_tiny_run_writes_metrics_and_a_checkpoint_and_resumes(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(tiny_args(run, data, "--stop-at", "4")) == 0
    assert read_checkpoint(run / "checkpoint.safetensors").step == 4
    assert main(["train", "--resume", str(run), "--device", "cpu", "--no-progress"]) == 0
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(7))
    assert [r["step"] for r in records if "val_loss" in r] == [0, 3, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in records[1:])
    ckpt = read_checkpoint(run / "checkpoint.safetensors")
    assert ckpt.step == 6 and ckpt.config["train"]["steps"] == 6 and ckpt.config["model"]["n_layer"] == 1
    assert json.loads((run / "config.json").read_text()) == ckpt.config
    assert "step 6" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--resume"):
        main(tiny_args(run, data))  # the folder is taken
    with pytest.raises(ValueError, match="saved settings"):
        main(["train", "--resume", str(run), "--set", "train.lr=1"])


def test_passkey_mix_resumes_exactly_and_leaves_validation_plain(tmp_path, data):
    mix = ["--set", "train.seq_len=96", "--set", "train.passkey_fraction=0.5", "--no-progress"]
    full, part, plain = tmp_path / "full", tmp_path / "part", tmp_path / "plain"
    assert main(tiny_args(full, data, *mix)) == 0
    assert main(tiny_args(part, data, *mix, "--stop-at", "3")) == 0
    assert main(["train", "--resume", str(part), "--device", "cpu", "--no-progress"]) == 0
    a, b = read_checkpoint(full / "checkpoint.safetensors"), read_checkpoint(part / "checkpoint.safetensors")
    assert a.step == b.step == 6 and a.config["train"]["passkey_fraction"] == 0.5
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert main(tiny_args(plain, data, "--set", "train.seq_len=96", "--no-progress")) == 0
    with_mix, without = read_metrics(full), read_metrics(plain)
    assert with_mix[0]["val_loss"] == without[0]["val_loss"]  # the same validation windows, plain text
    assert [r["loss"] for r in with_mix[1:]] != [r["loss"] for r in without[1:]]  # but other training batches
    with pytest.raises(ValueError, match="seq_len .* too short for the passkey mix"):
        main(tiny_args(tmp_path / "short", data, "--set", "train.passkey_fraction=0.1"))
    with pytest.raises(ValueError, match=r"passkey_fraction must be in \[0, 1\]"):
        main(tiny_args(tmp_path / "bad", data, "--set", "train.passkey_fraction=2"))
    weighted = tmp_path / "weighted"
    assert main(tiny_args(weighted, data, *mix, "--set", "train.passkey_answer_weight=50")) == 0
    assert read_metrics(weighted)[0]["val_loss"] == with_mix[0]["val_loss"]  # validation unweighted
    assert [r["loss"] for r in read_metrics(weighted)[1:]] != [r["loss"] for r in with_mix[1:]]
    with pytest.raises(ValueError, match="passkey_answer_weight must be > 0"):
        main(tiny_args(tmp_path / "bad_weight", data, "--set", "train.passkey_answer_weight=0"))
    needles = tmp_path / "needles"
    assert main(tiny_args(needles, data, *mix, "--set", "train.passkey_needles=2", "--set", "train.seq_len=160")) == 0
    assert read_metrics(needles)[-1]["step"] == 6
    with pytest.raises(ValueError, match="too short for the passkey mix: it needs seq_len >= 157 with passkey_needles=2"):
        main(tiny_args(tmp_path / "short2", data, "--set", "train.passkey_fraction=0.5",
                       "--set", "train.passkey_needles=2", "--set", "train.seq_len=120"))
    with pytest.raises(ValueError, match="passkey_needles must be >= 1"):
        main(tiny_args(tmp_path / "bad_needles", data, "--set", "train.passkey_needles=0"))


def test_config_file_toml_and_json(tmp_path, data):
    toml = tmp_path / "run.toml"
    toml.write_text(f'[model]\nn_layer = 1\nattention = "full"\n[model.nsa]\nwindow = 32\n'
                    f'[train]\nsteps = 2\nseq_len = 16\nbatch_size = 1\ndata = "{data}"\n')
    run = tmp_path / "toml-run"
    assert main(["train", "--config", str(toml), "--run", str(run), "--device", "cpu", "--no-progress",
                 "--set", "train.steps=3"]) == 0
    cfg = read_checkpoint(run / "checkpoint.safetensors").config
    assert (cfg["model"]["attention"], cfg["model"]["nsa"]["window"], cfg["train"]["steps"]) == ("full", 32, 3)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"n_layer": }')
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        main(["train", "--config", str(bad), "--run", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        main(["train", "--config", str(tmp_path / "missing.toml"), "--run", str(tmp_path / "x")])


def test_tiny_preset_lowers_the_loss(tmp_path, data):
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run", str(run), "--device", "cpu", "--no-progress",
                 "--set", f"train.data={data}", "--set", "train.steps=25"]) == 0
    val = [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert val[-1] < val[0] - 1.0, val


def test_plot_runs_writes_a_png(tmp_path, capsys):
    runs = []
    for k, name in enumerate(("nsa", "full")):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": 0, "val_loss": 5.5}] + [{"step": s, "loss": 5.0 - s / 10 - k, "lr": 1e-3} for s in range(1, 9)]
        lines[4]["val_loss"] = 4.0 - k
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9, "lo')
        runs.append(str(run))
    out = tmp_path / "plots" / "curves.png"
    assert main(["plot", *runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"loss plot saved to {out}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        main(["plot", str(tmp_path), "--out", str(out)])
