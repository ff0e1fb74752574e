"""The benchmark scripts parse their arguments on any machine: each runs `python benchmarks/NAME.py --help` as a
user would (no PYTHONPATH=benchmarks: `import common` must resolve from the script's own folder). No timing."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


def test_the_kept_scripts():
    assert SCRIPTS == ["bench_cp.py", "bench_decode.py", "bench_op.py", "check_model_grads.py", "memcheck_decode.py",
                       "profile_decode.py", "profile_step.py", "tune_kernels.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: " + script), out.stdout[:200]


def test_bench_op_prints_each_shape_as_it_is_measured():
    """bench_op writes each shape's line (and its results.json) as it goes, so a timed-out run keeps what ran."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_op
    finally:
        sys.path.remove(str(BENCHMARKS))
    rec = {"shape": "P", "T": 8192, "kernels": {"nsa": {"fwd": {"ms": 2.5}, "fwd_bwd": {"ms": 9.4}},
                                                "fla": {"fwd": {"ms": None, "error": "not installed"},
                                                        "fwd_bwd": {"ms": None, "error": "not installed"}}}}
    assert bench_op.shape_line(rec) == "P T=8192 fwd / fwd+bwd ms: nsa 2.50 / 9.40, fla n/a (error) / n/a (error)"
    assert bench_op.shape_line({"shape": "S", "T": 8, "error": "OOM"}) == "S T=8: OOM"
