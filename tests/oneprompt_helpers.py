"""Shared by the One-Prompt tests: a small decoder configuration, and one thread per test (the tests time
nothing; one thread keeps them from competing with a server test's subprocess)."""

import pytest
import torch

SMALL_LEVELS = (("neck", 8), ("stage2", 16), ("stage1", 16))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
