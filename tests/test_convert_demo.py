"""examples/convert_demo.py runs end to end (tiny sizes); with a window covering the sequence the converted model
starts where the dense one ended (up to the gates' leak)."""
import importlib.util
import math
from pathlib import Path

import pytest

pytest.importorskip("transformers")

DEMO = Path(__file__).resolve().parent.parent / "examples" / "convert_demo.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("convert_demo", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_runs_every_stage(capsys):
    losses = load_demo().main(["--dense-steps", "3", "--stage1-steps", "2", "--stage2-steps", "2", "--seq-len", "32",
                               "--batch-size", "2", "--val-batches", "2", "--window", "32", "--max-bytes", "300000"])
    assert list(losses) == ["dense original", "converted, untrained", "NSA after stage 1", "NSA after stage 2",
                            "dense continued"]
    assert all(math.isfinite(v) for v in losses.values())
    assert abs(losses["converted, untrained"] - losses["dense original"]) < 1e-2 * losses["dense original"]
    assert "NSA after stage 2" in capsys.readouterr().out


def test_demo_refuses_empty_stages():
    with pytest.raises(SystemExit):
        load_demo().main(["--stage1-steps", "0"])
