"""Shared test set-up."""

from __future__ import annotations

import os

import pytest
import torch

# The suite holds the optimizer to fp32 references (torch.optim.Muon patched to fp32, the batched
# path against the loop bit for bit), so it iterates in fp32 unless a test says otherwise. The
# machine-chosen default (bf16 where this CPU's bf16 matmuls are faster, and on CUDA) is tested with
# the probe stubbed both ways in tests/test_dtype_probe.py, and against float64 SVD error bands.
os.environ.setdefault("MUONLAB_NS_DTYPE", "fp32")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors in these tests are small: one intra-op thread is faster, and far faster when other
    # processes share the 2-core CPU (OpenMP threads then spin against each other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
