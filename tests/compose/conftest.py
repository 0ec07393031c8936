"""The composition tests use small analytic mixtures: one intra-op thread avoids wake-up costs that
dwarf the work (as tests/conftest.py does for core/ and sampling/)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
