"""Both tokenizer families implement the Tokenizer interface that evaluation, caching, sampling and
training use (tokenizers/base.py)."""

import pytest
import torch

from hieratok import HieraTok
from hieratok.tokenizers.base import Tokenizer
from hieratok.tokenizers.restok import ResTok
from hieratok.train.tasks import param_groups


def tokenizers():
    torch.manual_seed(0)
    return [HieraTok.from_preset("tiny", image_size=32, encoder_depth=1, decoder_depth=1).eval(),
            ResTok.from_preset("restok-tiny").eval()]


@pytest.mark.parametrize("i", [0, 1], ids=["hieratok", "restok"])
def test_interface_round_trip_and_sizes(i, gen):
    tok = tokenizers()[i]
    assert isinstance(tok, Tokenizer)
    size = tok.config.image_size
    x = torch.rand(2, 3, size, size, generator=gen) * 2 - 1
    with torch.no_grad():
        v = tok.tokenize(x)
        pyr, idx = tok.reconstruct(x)
        assert [p.shape[-1] for p in pyr] == tok.output_sides() and tok.output_sides()[-1] == size
        torch.testing.assert_close(tok.detokenize(v), pyr[-1], rtol=0, atol=0)
        if tok.codebook_size is None:  # continuous latents, every scale decoded
            assert v.is_floating_point() and idx is None
            assert [p.shape for p in tok.detokenize(v, all_scales=True)] == [p.shape for p in pyr]
        else:  # code indices within the codebook
            assert v.dtype == torch.long and torch.equal(idx, v) and int(v.max()) < tok.codebook_size
            with pytest.raises(ValueError, match="all_scales"):
                tok.detokenize(v, all_scales=True)


@pytest.mark.parametrize("i", [0, 1], ids=["hieratok", "restok"])
def test_last_layer_is_the_output_layer(i, gen):
    """The images are affine in the last layer's weight (nothing nonlinear follows it: f(2w) - f(w)
    = f(w) - f(0)), and it gets the reconstruction's gradient: what the adaptive GAN weight needs."""
    tok = tokenizers()[i]
    size = tok.config.image_size
    x = torch.rand(1, 3, size, size, generator=gen) * 2 - 1
    w = tok.last_layer()
    assert any(w is p for p in tok.parameters())
    rec = tok.reconstruct(x)[0][-1]
    (g,) = torch.autograd.grad(rec.square().sum(), w, allow_unused=True)
    assert g is not None and g.abs().sum() > 0
    w0 = w.detach().clone()
    outs = []
    with torch.no_grad():
        for k in (0.0, 1.0, 2.0):
            w.copy_(k * w0)
            outs.append(tok.reconstruct(x)[0][-1].double())
    step1, step2 = outs[1] - outs[0], outs[2] - outs[1]
    assert step1.abs().max() > 1e-3  # the weight matters
    torch.testing.assert_close(step2, step1, rtol=0, atol=1e-5 * outs[2].abs().max().item() + 1e-6)


def test_no_weight_decay_names_go_to_the_undecayed_group():
    hiera, res = tokenizers()
    names = hiera.no_weight_decay()
    assert names == {"encoder.pos_embed", "decoder.pos.pos_grid", "decoder.pos.scale_embed"}
    assert res.no_weight_decay() == set()
    decay, no_decay = param_groups([hiera], 0.05)
    skipped = {id(p) for n, p in hiera.named_parameters() if n in names}
    assert skipped <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim >= 2 and id(p) not in skipped for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for p in hiera.parameters() if p.requires_grad)
