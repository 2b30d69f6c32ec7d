"""Model wrapping: the per-block units that compile and FSDP2 work on."""

import pytest
import torch
from torch import nn

from hieratok import HieraTok
from hieratok.generators import DiT
from hieratok.generators.llamagen import GPT
from hieratok.train.parallel import DistInfo, _blocks, resolve_device, wrap_model

ONE = DistInfo(0, 1, 0, torch.device("cpu"))


@pytest.mark.parametrize("build, depth, kind", [
    (lambda: DiT(DiT.preset_config("dit-tiny")), 4, "DiTBlock"),
    (lambda: GPT(GPT.preset_config("gpt-tiny")), 2, "GPTBlock"),
    (lambda: HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=2), 3, "Block"),
])
def test_blocks_of_every_model_family(build, depth, kind):
    blocks = _blocks(build())
    assert len(blocks) == depth and {type(b).__name__ for b in blocks} == {kind}


def test_compile_of_a_model_without_blocks_is_an_error():
    with pytest.raises(ValueError, match="no `blocks`"):
        wrap_model(nn.Linear(2, 2), ONE, compile=True)
    m = nn.Linear(2, 2)  # a discriminator-like module may opt out
    assert wrap_model(m, ONE, compile=True, need_blocks=False) is m


@pytest.mark.parametrize("device, local, cuda, want", [
    (None, 3, True, "cuda:3"), (None, 3, False, "cpu"),
    ("cuda", 2, True, "cuda:2"),  # a bare "cuda" is this rank's GPU: set_device needs an index
    ("cuda:1", 2, True, "cuda:1"), ("cpu", 2, True, "cpu"), (torch.device("cuda"), 0, True, "cuda:0"),
])
def test_resolve_device_gives_each_rank_an_indexed_gpu(device, local, cuda, want):
    assert resolve_device(device, local, cuda) == torch.device(want)
