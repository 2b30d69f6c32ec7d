import os
from pathlib import Path

import pytest
import torch

# Deterministic, quiet and small: CI runs on 2 CPU cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Test folders whose models are tiny: one intra-op thread avoids thread hand-off costs (and
# oversubscription slowdowns on a busy 2-core CI machine).
ONE_THREAD_DIRS = ("convert", "generators/autoregressive", "tokenizers/restok")
_HERE = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    rel = Path(str(request.path)).resolve().relative_to(_HERE).as_posix()
    if not rel.startswith(ONE_THREAD_DIRS):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def tiny_gpt():
    """The tiny GPT with N(0, 0.2) weights (its zero-initialised head would give constant logits)."""
    from hieratok.generators.llamagen import GPT

    torch.manual_seed(0)
    m = GPT(GPT.preset_config("gpt-tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m
