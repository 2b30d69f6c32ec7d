import os

import pytest
import torch

# Deterministic, quiet and small: CI runs on 2 CPU cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)
