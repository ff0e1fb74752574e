"""The wheel: built offline from pyproject.toml, it holds every module and the `nsa` console script, needs only torch
(everything else is an extra), and once installed runs the command from the installed package."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Builds the wheel from a copy of the sources (the build writes build/ and *.egg-info next to them)."""
    pytest.importorskip("setuptools")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tree / "dist"), str(tree)], check=True, timeout=300)
    (built,) = (tree / "dist").glob("nsa-*.whl")
    return built


def test_wheel_holds_every_module_and_the_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "nsa").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    info = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "nsa = nsa.cli:main" in info.read(entry_points).decode().splitlines()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [line.split(":", 1)[1].strip() for line in info.read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist:")]
    unconditional = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in unconditional] == ["torch"], unconditional
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires)


def test_installed_wheel_runs_the_command(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy, not the sources
    where = subprocess.run([sys.executable, "-c", "import nsa; print(nsa.__file__)"], env=env, check=True,
                           capture_output=True, text=True, timeout=300).stdout
    assert Path(where.strip()).is_relative_to(target)
    script = target / "bin" / "nsa"
    usage = subprocess.run([sys.executable, str(script), "--help"], env=env, check=True, capture_output=True,
                           text=True, timeout=300).stdout
    assert "usage: nsa" in usage and "demo" in usage
