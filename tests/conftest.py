"""Shared pytest setup.

Without CUDA the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set
before triton is first imported, which conftest.py (loaded before any test module) guarantees
(the library itself adapts the interpreter to NumPy >= 2.4: ops/triton/utils.py).
Tests marked @pytest.mark.gpu are skipped without CUDA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
