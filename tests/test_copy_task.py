"""experiments/copy_task.py: the copy batches are what its docstring says, and the whole experiment runs at tiny
size on the CPU (its figures are in EXPERIMENTS.md)."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("copy_task", ROOT / "experiments" / "copy_task.py")
copy_task = importlib.util.module_from_spec(spec)
spec.loader.exec_module(copy_task)


def test_copy_batch_writes_the_symbols_twice_and_weights_only_the_second_copy():
    inputs, targets, weights = copy_task.copy_batch(3, 10, 5, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == weights.shape == (3, 19)
    seq = torch.cat((inputs, targets[:, -1:]), dim=1)
    assert torch.equal(seq[:, :10], seq[:, 10:]) and int(seq.max()) < 5
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    # weight on target j (= seq[j + 1]) exactly when seq[j + 1] is a second-copy symbol after the first: j >= 10
    assert torch.equal(weights[0], (torch.arange(19) >= 10).float())


def test_tiny_run_end_to_end(tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy.json"
    monkeypatch.setattr(sys, "argv", ["copy_task.py", "--models", "nsa,swa,full", "--half", "24", "--window", "8",
                                      "--block", "8", "--selected", "3", "--width", "16", "--heads", "2",
                                      "--batch", "2", "--steps", "2", "--eval-every", "1", "--out", str(out)])
    copy_task.main()
    result = json.loads(out.read_text())
    assert result["chance"] == pytest.approx(math.log(16))
    assert set(result["results"]) == {"nsa", "swa", "full"}
    for name, r in result["results"].items():
        assert [step for step, _ in r["curve"]] == [0, 1, 2] and math.isfinite(r["final_loss"])
        assert len(r["layers"]) == (0 if name == "full" else 2)
    swa_gates = result["results"]["swa"]["layers"][0]["gate_mean"]
    assert swa_gates["cmp"] == swa_gates["slc"] == 0.0 < swa_gates["swa"]
    assert "| nsa |" in capsys.readouterr().out


def test_refuses_a_window_that_reaches_the_first_copy(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["copy_task.py", "--half", "16", "--window", "15"])
    with pytest.raises(SystemExit, match="window"):
        copy_task.main()
