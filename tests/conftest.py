"""Shared test fixtures: float64 dense reference, per-dtype tolerances, backends to test.

Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be switched on before the kernels are
defined, so before anything imports triton_sort.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from reference import BACKENDS

import triton_sort  # noqa: F401


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)



# Caches from earlier runs must not change what the suite runs: tuned launch configurations, and Inductor's
# compiled graphs (keyed without the custom ops' schemas, so a changed op could meet a stale graph).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="triton-sort-test-inductor-"))
os.environ.setdefault("TRITON_SORT_CACHE_DIR", tempfile.mkdtemp(prefix="triton-sort-test-cache-"))
