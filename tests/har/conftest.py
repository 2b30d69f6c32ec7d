import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The tiny GPT's ops are far smaller than the cost of syncing threads on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
