"""tests/model: run single-threaded. The CPU box is 2 shared cores; torch's intra-op threads contending with
other processes make tiny-tensor ops 10-50x slower (index_add_, small matmuls), while one thread is fast."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
