import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """The tiny GPT's ops are far smaller than the cost of syncing threads on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    """The tiny GPT with N(0, 0.2) weights (its zero-initialised head would give constant logits)."""
    from hieratok.generators.llamagen import GPT

    torch.manual_seed(0)
    m = GPT(GPT.preset_config("gpt-tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m
