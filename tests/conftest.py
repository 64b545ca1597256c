"""Shared test setup: every test starts from the same random state, so failures reproduce."""
import pytest
import torch


@pytest.fixture(autouse=True)
def seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread mostly waits on a busy machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
