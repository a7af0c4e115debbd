"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors in these tests are small: one intra-op thread is faster, and far faster when other
    # processes share the 2-core CPU (OpenMP threads then spin against each other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
