"""`cache-latents --update-tokenizer`: the latents' statistics go into the HieraTok folder's
config.json only when asked, validated, and only into a folder that can take them."""

import json

import pytest
import torch

from hieratok import HieraTok, HieraTokConfig
from hieratok.cli import main
from hieratok.tokenizers import ResTok


def test_statistics_are_written_only_with_the_flag(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    torch.manual_seed(0)
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tok_dir)
    before = (tok_dir / "config.json").read_bytes()
    assert main(["cache-latents", "--checkpoint", str(tok_dir), "--num", "8", "--out", str(tmp_path / "a")]) == 0
    assert (tok_dir / "config.json").read_bytes() == before
    assert main(["cache-latents", "--checkpoint", str(tok_dir), "--num", "8", "--out", str(tmp_path / "b"),
                 "--update-tokenizer"]) == 0
    assert f"latent mean/std written into {tok_dir.resolve()}/config.json" in capsys.readouterr().out
    cache = json.loads((tmp_path / "b" / "cache.json").read_text())
    after = json.loads((tok_dir / "config.json").read_text())
    assert after["latent_mean"] == cache["mean"] and after["latent_std"] == cache["std"]
    assert {k: v for k, v in after.items() if not k.startswith("latent_")} == {
        k: v for k, v in json.loads(before).items() if not k.startswith("latent_")}  # nothing else changed
    tok = HieraTok.from_pretrained(tok_dir)  # the weights still load; the statistics are config fields
    assert tok.config.latent_mean == tuple(cache["mean"]) and len(tok.config.latent_std) == 8


def test_targets_that_cannot_take_statistics_are_refused_before_encoding(tmp_path, capsys):
    ResTok.from_preset("restok-tiny").save_pretrained(tmp_path / "restok")
    assert main(["cache-latents", "--checkpoint", str(tmp_path / "restok"), "--num", "8", "--out", str(tmp_path / "c"),
                 "--update-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'restok' (ResTok caches codes" in err and not (tmp_path / "c").exists()


@pytest.mark.parametrize("fields,match", [
    (dict(latent_mean=[0.0] * 8), "give both latent_mean and latent_std"),
    (dict(latent_mean=[0.0] * 7, latent_std=[1.0] * 7), "latent_mean has 7 values for 8 latent channels"),
    (dict(latent_mean=[0.0] * 8, latent_std=[1.0] * 7 + [0.0]), "latent_std finite and > 0"),
    (dict(latent_mean=[float("nan")] * 8, latent_std=[1.0] * 8), "latent_mean must be finite"),
])
def test_bad_statistics_are_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        HieraTok.preset_config("tiny", **fields)


def test_statistics_do_not_change_the_architecture(tmp_path):
    torch.manual_seed(0)
    m = HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1)
    m.save_pretrained(tmp_path / "m")
    with_stats = HieraTok.from_pretrained(tmp_path / "m", latent_mean=[0.0] * 8, latent_std=[2.0] * 8)
    assert with_stats.config.latent_std == (2.0,) * 8 and isinstance(with_stats.config, HieraTokConfig)
