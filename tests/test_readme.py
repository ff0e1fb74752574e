"""The README's Python example runs as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert scope["o"].shape == scope["q"].shape
    assert scope["ids"].shape[-1] == scope["config"].num_selected
    assert scope["y"].shape == (1, 1024, 512) and torch.isfinite(scope["y"]).all()
