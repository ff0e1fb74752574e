"""Shared pytest setup.

Without CUDA the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, which conftest.py (loaded before any test module) guarantees.
Tests marked @pytest.mark.gpu are skipped without CUDA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _let_interpreter_index_with_numpy_2_4() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and turns them into Python ints
    with int(array), which NumPy >= 2.4 refuses: `range(lo, hi)` with run-time bounds fails inside
    kernels. Re-register tensor.__index__ through .item() (a no-op change on older NumPy; skipped on
    Triton versions without this hook)."""
    import triton.runtime.interpreter as interpreter

    patch_lang_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_lang_tensor is None:
        return

    def patch_with_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_with_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _let_interpreter_index_with_numpy_2_4()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
