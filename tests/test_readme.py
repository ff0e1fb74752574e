"""The README's Python examples run as written."""
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(i):
    scope = {}
    exec(compile(BLOCKS[i], f"{README}:python-block-{i}", "exec"), scope)
    return scope


def test_api_example_runs():
    scope = run_block(0)
    assert scope["o"].shape == scope["q"].shape
    assert scope["ids"].shape[-1] == scope["config"].num_selected
    assert scope["y"].shape == (1, 1024, 512) and torch.isfinite(scope["y"]).all()


def test_decoding_example_runs():
    scope = run_block(1)
    prompt, out = scope["prompt"], scope["out"]
    assert out.shape[0] == 1 and prompt.shape[1] < out.shape[1] <= prompt.shape[1] + 20
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    assert scope["cache"].host_seqlens == [prompt.shape[1] + 1]  # after the trim
