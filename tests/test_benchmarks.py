"""The benchmark scripts parse their arguments on any machine: each runs `python benchmarks/NAME.py --help` as a
user would (no PYTHONPATH=benchmarks: `import common` must resolve from the script's own folder). No timing."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def test_the_kept_scripts():
    assert SCRIPTS == ["bench_cp.py", "bench_decode.py", "bench_op.py", "check_model_grads.py", "memcheck_decode.py",
                       "profile_decode.py", "profile_step.py", "selection_overlap.py", "tune_kernels.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: " + script), out.stdout[:200]


def benchmark_module(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_op_prints_each_shape_as_it_is_measured():
    """bench_op writes each shape's line (and its results.json) as it goes, so a timed-out run keeps what ran."""
    bench_op = benchmark_module("bench_op")
    rec = {"shape": "P", "T": 8192, "kernels": {"nsa": {"fwd": {"ms": 2.5}, "fwd_bwd": {"ms": 9.4}},
                                                "fla": {"fwd": {"ms": None, "error": "not installed"},
                                                        "fwd_bwd": {"ms": None, "error": "not installed"}}}}
    assert bench_op.shape_line(rec) == "P T=8192 fwd / fwd+bwd ms: nsa 2.50 / 9.40, fla n/a (error) / n/a (error)"
    assert bench_op.shape_line({"shape": "S", "T": 8, "error": "OOM"}) == "S T=8: OOM"


def test_selection_overlap_load_share():
    load_share = benchmark_module("selection_overlap").load_share
    same = torch.tensor([0, 3, 5, -1]).expand(1, 16, 2, 4)  # every query: blocks 0, 3, 5 (one slot unused)
    assert load_share(same, 4, 0) == 0.25
    disjoint = torch.arange(16 * 3).view(1, 16, 1, 3)  # no two queries share a block
    assert load_share(disjoint, 4, 0) == 1.0
    assert load_share(disjoint, 2, 5) == 1.0  # tiles start at query 6 (a multiple of 2 past 5)
    half = torch.tensor([[7, 1], [7, 2]]).repeat(8, 1).view(1, 16, 1, 2)  # pairs share one of their two blocks
    assert load_share(half, 2, 0) == 0.75
    with pytest.raises(ValueError, match="no whole tile"):
        load_share(same, 16, 1)


def test_selection_overlap_shape_ids_lays_windows_side_by_side():
    shape_ids = benchmark_module("selection_overlap").shape_ids
    ids = torch.arange(3 * 5 * 2 * 4).view(3, 5, 2, 4)  # 3 windows, 5 queries, 2 KV heads, 4 slots
    out = shape_ids(ids, 4)
    assert out.shape == (1, 5, 4, 4) and out.dtype == torch.int32
    assert torch.equal(out[0, :, 0], ids[0, :, 0].int()) and torch.equal(out[0, :, 1], ids[0, :, 1].int())
    assert torch.equal(out[0, :, 2], ids[1, :, 0].int()) and torch.equal(out[0, :, 3], ids[1, :, 1].int())
    with pytest.raises(SystemExit, match="raise --windows"):
        shape_ids(ids, 8)
