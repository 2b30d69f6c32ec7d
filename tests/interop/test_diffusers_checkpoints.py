"""A diffusers AutoencoderKL folder (`--checkpoint diffusers:<dir>`) scored and cached by hieratok's
commands under its own protocol, side by side with a HieraTok; and HieraTok latent statistics
written by `cache-latents --update-tokenizer` normalising the cache through the adapter."""

import json

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from skimage.metrics import peak_signal_noise_ratio  # noqa: E402

from hieratok import HieraTok  # noqa: E402
from hieratok.cli import main  # noqa: E402
from hieratok.data import EmbeddedPhotos  # noqa: E402
from hieratok.interop.diffusers import AutoencoderKLTokenizer, as_diffusers_vae  # noqa: E402
from hieratok.registry import GENERATORS, load_model  # noqa: E402
from hieratok.tokenizers.base import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny random AutoencoderKL (64 px -> 4 x 32 x 32) and a tiny HieraTok, saved."""
    root = tmp_path_factory.mktemp("diffusers")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  sample_size=64).save_pretrained(root / "vae")
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(root / "tok")
    return root


def u8(t):
    return ((t.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def test_autoencoderkl_loads_as_a_tokenizer(dirs, tmp_path):
    tok, info = load_model(f"diffusers:{dirs / 'vae'}")
    ref = AutoencoderKL.from_pretrained(dirs / "vae").eval()
    assert isinstance(tok, AutoencoderKLTokenizer) and isinstance(tok, Tokenizer) and not tok.training
    assert info["model_type"] == "autoencoderkl" and info["source"] == f"diffusers:{(dirs / 'vae').resolve()}"
    assert (tok.config.image_size, tok.config.latent_channels, tok.config.downsample_factor) == (64, 4, 2)
    x = torch.stack([EmbeddedPhotos("heldout", 64)[i][0] for i in range(2)])
    z = tok.tokenize(x)
    assert torch.equal(z, ref.encode(x).latent_dist.mode()) and z.shape == (2, 4, 32, 32)
    assert torch.equal(tok.detokenize(z), ref.decode(z).sample)
    (rec,), idx = tok.reconstruct(x)
    assert idx is None and torch.equal(rec, ref.decode(z).sample) and tok.output_sides() == [64]
    with pytest.raises(ValueError, match="one output scale"):
        tok.detokenize(z, all_scales=True)
    with pytest.raises(TypeError, match="wraps a diffusers AutoencoderKL already: use its .vae"):
        as_diffusers_vae(tok)
    assert load_model(f"diffusers:{dirs / 'vae'}", image_size=32)[0].config.image_size == 32
    (tmp_path / "pipe").mkdir()  # a pipeline folder: the VAE in vae/
    ref.save_pretrained(tmp_path / "pipe" / "vae")
    assert load_model(f"diffusers:{tmp_path / 'pipe'}")[1]["model_dir"] == str(tmp_path / "pipe" / "vae")


def test_bad_diffusers_checkpoints_are_one_line_errors(dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json; diffusers:<dir> takes a folder"):
        load_model(f"diffusers:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="load it as diffusers:"):
        load_model(dirs / "vae")
    with pytest.raises(ValueError, match="is not one of"):
        load_model(f"diffusers:{dirs / 'vae'}", expect=GENERATORS)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="of a diffusers 'UNet2DModel', not an AutoencoderKL"):
        load_model(f"diffusers:{tmp_path / 'unet'}")
    with pytest.raises(ValueError, match="not a positive multiple of the VAE's downsampling factor 2"):
        load_model(f"diffusers:{dirs / 'vae'}", image_size=33)


@torch.no_grad()
def test_eval_recon_scores_autoencoderkl_and_hieratok_side_by_side(dirs, tmp_path, capsys):
    common = ["--num", "6", "--batch-size", "6", "--perceptual", "none", "--no-fid"]
    assert main(["eval", "recon", "--checkpoint", f"diffusers:{dirs / 'vae'}", "--out", str(tmp_path / "sd-vae")] + common) == 0
    assert main(["eval", "recon", "--checkpoint", str(dirs / "tok"), "--out", str(tmp_path / "hieratok")] + common) == 0
    got = json.loads((tmp_path / "sd-vae" / "metrics.json").read_text())
    # independent reference: diffusers' own encode -> posterior mode -> decode, scikit-image PSNR on
    # the same uint8 images (6 of the 12 held-out crops, evenly spaced)
    ref = AutoencoderKL.from_pretrained(dirs / "vae").eval()
    ds = EmbeddedPhotos("heldout", 64)
    x = torch.stack([ds[i][0] for i in range(0, 12, 2)])
    rec = ref.decode(ref.encode(x).latent_dist.mode()).sample
    psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(u8(x), u8(rec))])
    assert got["num_images"] == 6 and got["psnr"] == pytest.approx(psnr, abs=1e-6)
    assert got["checkpoint"]["model_type"] == "autoencoderkl" and list(got["psnr_per_scale"]) == ["64"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "hieratok"), str(tmp_path / "sd-vae")]) == 0
    table = capsys.readouterr().out
    ours = json.loads((tmp_path / "hieratok" / "metrics.json").read_text())["psnr"]
    assert "sd-vae" in table and "hieratok" in table and f"{got['psnr']:.2f} ({got['psnr'] - ours:+.2f})" in table


@torch.no_grad()
def test_cache_and_latent_eval_of_autoencoderkl(dirs, tmp_path, capsys):
    vae = f"diffusers:{dirs / 'vae'}"
    assert main(["cache-latents", "--checkpoint", vae, "--num", "8", "--out", str(tmp_path / "cache")]) == 0
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())
    assert meta["tokenizer"] == f"diffusers:{(dirs / 'vae').resolve()}" and meta["tokenizer_type"] == "autoencoderkl"
    assert meta["shape"] == [4, 32, 32] and len(meta["mean"]) == 4
    cached = load_file(str(tmp_path / "cache" / "shard-00000.safetensors"))["latents"]
    x = torch.stack([EmbeddedPhotos("train", 64, length=8, seed=0, hflip=False, short_side=128)[i][0] for i in (0, 7)])
    ref = AutoencoderKL.from_pretrained(dirs / "vae").eval()
    torch.testing.assert_close(cached[[0, 7]], ref.encode(x).latent_dist.mode(), rtol=0, atol=0)
    assert load_model(meta["tokenizer"])[1]["model_type"] == "autoencoderkl"  # the record loads again
    assert main(["eval", "latents", "--checkpoint", vae, "--num-images", "12", "--num-points", "12", "--runs", "1",
                 "--iterations", "250", "--out", str(tmp_path / "lat")]) == 0
    assert json.loads((tmp_path / "lat" / "latents.json").read_text())["latent_shape"] == [4, 32, 32]
    capsys.readouterr()
    assert main(["cache-latents", "--checkpoint", vae, "--num", "8", "--out", str(tmp_path / "c2"), "--update-tokenizer"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "a diffusers VAE keeps its own scaling" in err and not (tmp_path / "c2").exists()


def test_written_statistics_normalise_the_cache_through_the_adapter(dirs, tmp_path):
    """cache-latents --update-tokenizer -> config.json -> as_diffusers_vae: the scaled cache has mean 0
    and std 1 (global), or per channel (channel): statistics and this check both in float64."""
    import shutil

    shutil.copytree(dirs / "tok", tmp_path / "tok")
    assert main(["cache-latents", "--checkpoint", str(tmp_path / "tok"), "--num", "16", "--out", str(tmp_path / "c"),
                 "--update-tokenizer"]) == 0
    vae = as_diffusers_vae(HieraTok.from_pretrained(tmp_path / "tok"))
    z = load_file(str(tmp_path / "c" / "shard-00000.safetensors"))["latents"].double()  # (16, 8, 8, 8)
    zg = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(zg.mean().item()) < 1e-9 and zg.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-9)
    c = as_diffusers_vae(HieraTok.from_pretrained(tmp_path / "tok"), normalization="channel").config
    per_channel = lambda v: torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1)  # noqa: E731
    zc = (z - per_channel(c.latents_mean)) * c.scaling_factor / per_channel(c.latents_std)
    assert zc.mean(dim=(0, 2, 3)).abs().max().item() < 1e-9
    torch.testing.assert_close(zc.std(dim=(0, 2, 3), unbiased=False), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-9)
