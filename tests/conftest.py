import pytest
import torch


@pytest.fixture
def one_thread():
    # Small problems run fastest on one thread, and the timings of other jobs stay honest.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
