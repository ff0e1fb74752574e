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
    inputs, targets, weights, sources = copy_task.copy_batch(3, 10, 5, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == weights.shape == sources.shape == (3, 19)
    seq = torch.cat((inputs, targets[:, -1:]), dim=1)
    assert torch.equal(seq[:, :10], seq[:, 10:]) and int(seq.max()) < 5
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    # weight on target j (= seq[j + 1]) exactly when seq[j + 1] is a second-copy symbol after the first: j >= 10
    assert torch.equal(weights[0], (torch.arange(19) >= 10).float())
    assert torch.equal(sources[0], torch.where(torch.arange(19) >= 10, torch.arange(19) - 9, -1))


def test_shuffled_copy_repeats_each_segment_from_its_source_beyond_the_gap():
    half, segment, gap = 24, 4, 6
    inputs, targets, weights, sources = copy_task.copy_batch(8, half, 50, torch.Generator().manual_seed(0), segment, gap)
    T = 2 * half + gap
    assert inputs.shape == sources.shape == (8, T - 1)
    seq = torch.cat((inputs, targets[:, -1:]), dim=1)
    second = seq[:, half + gap:].unflatten(1, (half // segment, segment))  # [B, segments, segment]
    first = seq[:, :half].unflatten(1, (half // segment, segment))
    assert all(sorted(map(tuple, second[b].tolist())) == sorted(map(tuple, first[b].tolist())) for b in range(8))
    assert any(not torch.equal(second[b], first[b]) for b in range(8))  # some order is shuffled
    counted = weights > 0
    # counted: the second part's symbols but each segment's first; their sources repeat them from beyond the gap
    offset = torch.arange(1, T) - (half + gap)
    assert torch.equal(counted[0], (offset >= 0) & (offset % segment != 0))
    assert torch.equal((sources >= 0), counted)
    rows = torch.arange(8)[:, None].expand_as(sources)
    assert torch.equal(seq[rows[counted], sources[counted]], targets[counted])
    assert int((torch.arange(T - 1).expand_as(sources) - sources)[counted].min()) >= gap


@pytest.mark.parametrize("shuffle", [[], ["--segment", "8", "--gap", "8"]])
def test_tiny_run_end_to_end(tmp_path, monkeypatch, capsys, shuffle):
    out = tmp_path / "copy.json"
    monkeypatch.setattr(sys, "argv", ["copy_task.py", "--models", "nsa,swa,full", "--half", "24", "--window", "8",
                                      "--block", "8", "--selected", "3", "--width", "16", "--heads", "2",
                                      "--batch", "2", "--steps", "2", "--eval-every", "1", "--out", str(out)] + shuffle)
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
    monkeypatch.setattr(sys, "argv", ["copy_task.py", "--half", "16", "--segment", "4", "--gap", "7", "--window", "8"])
    with pytest.raises(SystemExit, match="--gap"):
        copy_task.main()
