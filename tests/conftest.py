"""Shared test fixture: one torch thread."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from 2 threads and contend on a shared 2-core machine; in-process runs then also sum
    in the same order as the subprocess runs (OMP_NUM_THREADS=1), bit for bit. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
