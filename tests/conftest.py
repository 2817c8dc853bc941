"""Shared test set-up: GPU tests (marked `gpu`) skip cleanly on machines without CUDA."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests/kda_testing.py

HAS_CUDA = torch.cuda.is_available()

# The CPU tests run many small matrix products; one thread avoids OpenMP overhead and contention on the
# 2-core CI machine and makes timings of the CPU path repeatable.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
