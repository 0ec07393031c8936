"""One intra-op thread for this folder's tests: their tensors are tiny, and on a shared 2-core machine
extra threads only add wake-up cost (a 2-D DEFT fit ran 30× slower with 2 threads than with 1).
Module-scoped, so it is in force before the module-scoped fitted-model fixtures too."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _single_intra_op_thread_for_condition():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
