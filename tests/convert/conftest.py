import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """The ResTok test models are tiny: one intra-op thread avoids thread hand-off cost (and
    oversubscription slowdowns on a busy 2-core CI machine). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
