"""Deterministic CUDA for the GPU tests, so that a bitwise difference is Sentinel's; the
GPU's memory released after each test.

cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it starts, so it is set here, when
pytest collects this directory, before any test runs a kernel (scripts/gpu_check.sh
exports it as well). Deterministic algorithms are strict (no ``warn_only``): an op
without a deterministic CUDA kernel raises, and the test workloads (models.py)
avoid such ops instead of hiding them.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

# set too late if CUDA had started before this file was imported without it
_TOO_LATE = torch.cuda.is_initialized() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _deterministic_cuda():
    if _TOO_LATE:
        pytest.fail("CUDA started before CUBLAS_WORKSPACE_CONFIG was set: run the GPU tests "
                    "with CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment")
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:]


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """What a test left (a failed one's frames are gone by teardown) is freed before the next,
    so that the allocator's peaks in one test are that test's own."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
