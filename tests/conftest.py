"""Shared by every test file: the tests build tiny models, which run fastest on one thread (several threads spin
against each other on a small machine; train.py subprocesses get OMP_NUM_THREADS=1 from their tests)."""
import pytest
import torch


@pytest.fixture(autouse=True, scope='session')
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
