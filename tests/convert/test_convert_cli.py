import torch
from safetensors.torch import save_file

from hieratok.cli import main
from hieratok.convert import to_official_gpt_state_dict, to_official_state_dict
from hieratok.generators import GPT
from hieratok.tokenizers import ResTok


def _randomise(m: torch.nn.Module) -> torch.nn.Module:
    """Distinct random values in every tensor (zero-initialised heads and layer scales would give
    outputs that a swapped or dropped mapping cannot change)."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


def test_convert_restok_release_layout_to_model_folder(tmp_path, capsys):
    torch.manual_seed(0)
    ours = _randomise(ResTok.from_preset("restok-tiny")).eval()
    official = to_official_state_dict(ours.state_dict())
    save_file({k: v.contiguous() for k, v in official.items()}, str(tmp_path / "release.safetensors"))
    c = ours.config
    assert main(["convert", "restok", str(tmp_path / "release.safetensors"), "--out", str(tmp_path / "out"),
                 f"image_size={c.image_size}", f"legacy_latent_layout={str(c.legacy_latent_layout).lower()}",
                 f"min_latent_tokens={c.min_latent_tokens}"]) == 0
    back = ResTok.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    x = torch.rand(2, 3, c.image_size, c.image_size) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.encode(x)["indices"], back.encode(x)["indices"])
    # a tampered release names the key
    official["encoder.bogus.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in official.items()}, str(tmp_path / "bad.safetensors"))
    assert main(["convert", "restok", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o2"),
                 f"image_size={c.image_size}"]) == 2
    assert "encoder.bogus.weight" in capsys.readouterr().err


def test_convert_har_gpt(tmp_path):
    torch.manual_seed(0)
    cfg = GPT.preset_config("gpt-tiny")
    ours = _randomise(GPT(cfg)).eval()
    save_file({k: v.contiguous() for k, v in to_official_gpt_state_dict(ours.state_dict(), cfg).items()},
              str(tmp_path / "gpt.safetensors"))
    # the head count is not in the weights: inference assumes LlamaGen's 64-wide heads, gpt-tiny's are 16
    assert main(["convert", "har", str(tmp_path / "gpt.safetensors"), "--out", str(tmp_path / "out"),
                 f"num_heads={cfg.num_heads}"]) == 0
    back = GPT.from_pretrained(tmp_path / "out").eval()
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in ours.state_dict().items())
    tok = torch.randint(0, cfg.vocab_size, (2, 7))
    y = torch.tensor([1, 2])
    with torch.no_grad():
        logits = ours(tok, y)
        assert logits.std() > 0.1  # not the constant logits of a zero head
        torch.testing.assert_close(logits, back(tok, y))
