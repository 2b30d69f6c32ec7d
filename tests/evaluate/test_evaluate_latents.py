"""Latent-uniformity evaluation: the VA-VAE protocol's flips and training statistics, the pooled
protocol's earlier settings, and the `hieratok eval latents` command."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import hieratok.evaluate.latents as lat_mod
import hieratok.metrics.uniformity as uni
from hieratok import HieraTok
from hieratok.cli import main
from hieratok.data import EmbeddedPhotos
from hieratok.evaluate import evaluate_latents
from hieratok.evaluate.latents import encode_latents, encode_latents_and_mirrored, load_latent_stats


class PoolingStub:
    """A "tokenizer" whose latent is the image average-pooled to 8x8: a mirrored input gives the
    mirrored latent, so the latents show which images were flipped before encoding."""

    def __init__(self, size: int = 64) -> None:
        self.config = SimpleNamespace(image_size=size)
        self.inputs = []

    def encode(self, x):
        self.inputs.append(x.clone())
        z = F.avg_pool2d(x, x.shape[-1] // 8)
        return SimpleNamespace(mode=lambda: z)


@pytest.fixture
def fast_tsne(monkeypatch):
    """t-SNE replaced by the first two coordinates (the tests here check inputs, not embeddings)."""
    seen = []

    def fake(x, seed, perplexity, iterations, num_threads):
        seen.append(x.copy())
        return x[:, :2] + 1e-3 * np.arange(len(x))[:, None]

    monkeypatch.setattr(uni, "_tsne", fake)
    return seen


def _record_uniformity(monkeypatch) -> list[dict]:
    calls = []
    real = lat_mod.latent_uniformity

    def record(latents, **kw):
        calls.append({"latents": latents, **kw})
        return real(latents, **kw)

    monkeypatch.setattr(lat_mod, "latent_uniformity", record)
    return calls


def test_flip_encodes_the_mirrored_images(monkeypatch, fast_tsne):
    calls = _record_uniformity(monkeypatch)
    stub = PoolingStub()
    x = torch.stack([EmbeddedPhotos("heldout", 64)[i][0] for i in range(0, 12, 2)])  # 6 of the 12 crops
    res = evaluate_latents(stub, None, num_images=6, num_points=6, num_runs=1)  # VA-VAE default: flips on
    assert res["protocol"] == "vavae" and res["flip"] is True
    # every batch was encoded twice: as read, then mirrored (VA-VAE: centre crop, flip, encode)
    assert len(stub.inputs) == 2
    torch.testing.assert_close(stub.inputs[0], x)
    torch.testing.assert_close(stub.inputs[1], x.flip(-1))
    z, z_flip = calls[0]["latents"], calls[0]["latents_flip_NCHW"]
    torch.testing.assert_close(z_flip, F.avg_pool2d(x.flip(-1), 8))
    torch.testing.assert_close(z_flip, z.flip(-1))  # pooling commutes with the mirror
    assert not torch.equal(z_flip, z)
    # encode_latents(mirror=True) gives the same mirrored latents for a caller (the demo)
    torch.testing.assert_close(encode_latents(PoolingStub(), None, 6, mirror=True), z_flip)
    torch.testing.assert_close(encode_latents(PoolingStub(), None, 6), z)
    one_pass = PoolingStub()
    pair = encode_latents_and_mirrored(one_pass, None, 6)  # both from one pass over the data (the ablation)
    torch.testing.assert_close(pair[0], z)
    torch.testing.assert_close(pair[1], z_flip)
    assert len(one_pass.inputs) == 2
    # --no-flip: one pass, no mirrored latents
    stub = PoolingStub()
    res = evaluate_latents(stub, None, num_images=6, num_points=6, num_runs=1, flip=False)
    assert res["flip"] is False and len(stub.inputs) == 1 and calls[-1]["latents_flip_NCHW"] is None


def test_fewer_images_than_points_uses_every_image_each_run(fast_tsne, caplog):
    z = torch.randn(20, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    res = evaluate_latents(None, None, latents=z, num_points=100, num_runs=3, perplexity=30.0)
    assert res["num_points"] == 20 and res["num_points_requested"] == 100 and res["all_images_each_run"]
    assert res["perplexity"] == pytest.approx(19 / 3) and "20 images (one position each) available" in caplog.text
    assert res["num_runs"] == 3 and res["flip"] is False and res["normalization"] == "eval-set"
    for x in fast_tsne:  # each run: one vector of each of the 20 images
        assert x.shape == (20, 4)
    res = evaluate_latents(None, None, latents=z, num_points=10, num_runs=1, perplexity=3.0)
    assert res["num_points"] == 10 and not res["all_images_each_run"]


def test_pooled_protocol_keeps_the_earlier_settings(caplog):
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))  # 32 positions
    res = evaluate_latents(None, None, latents=z, protocol="pooled", num_points=200, num_runs=1, iterations=250,
                           perplexity=30.0)
    assert (res["num_points"], res["iterations"], res["protocol"]) == (32, 250, "pooled")
    assert res["perplexity"] == pytest.approx(31 / 3)  # capped at (points - 1) / 3
    assert "asked: 200, 30" in caplog.text and "32 positions available" in caplog.text
    assert res["normalization"] == "eval-set" and res["tsne_seed"] == "per run" and not res["all_images_each_run"]


def test_training_statistics_sources(tmp_path, monkeypatch, fast_tsne):
    calls = _record_uniformity(monkeypatch)
    z = torch.randn(12, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    mean, std = [0.5, -1.0, 2.0], [1.5, 0.5, 3.0]
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({"kind": "latents", "mean": mean, "std": std}))
    np.savez(tmp_path / "stats.npz", mean=np.array(mean), std=np.array(std))
    torch.save({"mean": torch.tensor(mean).view(1, 3, 1, 1), "std": torch.tensor(std).view(1, 3, 1, 1)},
               tmp_path / "latents_stats.pt")  # VA-VAE's file
    sources = [tmp_path / "cache", str(tmp_path / "cache" / "cache.json"), tmp_path / "stats.npz",
               tmp_path / "latents_stats.pt", {"mean": mean, "std": std}, (np.array(mean), torch.tensor(std))]
    kw = dict(latents=z, num_points=10, num_runs=1, perplexity=3.0)
    for src in sources:
        res = evaluate_latents(None, None, train_stats=src, **kw)
        assert res["normalization"] == "train" and res["train_stats_source"] is not None
        np.testing.assert_allclose(calls[-1]["channel_mean"], mean, rtol=1e-6)
        np.testing.assert_allclose(calls[-1]["channel_std"], std, rtol=1e-6)
    # closed form: the given statistics shift and scale the vectors t-SNE sees
    draw = uni.sample_one_position_per_image(z, 10, np.random.default_rng(0)).vectors_PC
    np.testing.assert_allclose(fast_tsne[-1], (draw - np.array(mean)) / np.array(std), atol=1e-12)
    # training latents: their own per-channel statistics
    train = torch.randn(30, 3, 2, 2, generator=torch.Generator().manual_seed(1)) * 2 + 5
    res = evaluate_latents(None, None, train_latents=train, **kw)
    assert res["train_stats_source"] == "train_latents" and res["num_train_images"] == 30
    np.testing.assert_allclose(calls[-1]["channel_mean"], train.double().mean((0, 2, 3)).numpy(), atol=1e-12)
    np.testing.assert_allclose(calls[-1]["channel_std"], train.double().std((0, 2, 3), unbiased=False).numpy(),
                               atol=1e-12)
    res = evaluate_latents(None, None, **kw)
    assert res["normalization"] == "eval-set" and res["train_stats_source"] is None
    with pytest.raises(ValueError, match="one source of training statistics"):
        evaluate_latents(None, None, train_stats=tmp_path / "stats.npz", train_latents=train, **kw)


def test_training_statistics_from_training_images(monkeypatch, fast_tsne):
    calls = _record_uniformity(monkeypatch)
    from hieratok.evaluate.latents import _encode

    z = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(lat_mod, "build_dataset", lambda spec, split, size, **kw: EmbeddedPhotos("heldout", size))
    res = evaluate_latents(PoolingStub(), None, train_data="train-images", num_train_images=5, latents=z,
                           num_points=10, num_runs=1, perplexity=3.0)
    ref = _encode(PoolingStub(), None, 5)[0].double()
    assert res["train_stats_source"] == "train_data: train-images" and res["num_train_images"] == 5
    np.testing.assert_allclose(calls[-1]["channel_mean"], ref.mean((0, 2, 3)).numpy(), atol=1e-12)


def test_latent_stats_files_that_hold_none(tmp_path):
    (tmp_path / "codes").mkdir()
    (tmp_path / "codes" / "cache.json").write_text(json.dumps({"kind": "codes", "num": 3}))
    with pytest.raises(ValueError, match="no per-channel 'mean' and 'std'"):
        load_latent_stats(tmp_path / "codes")
    with pytest.raises(FileNotFoundError, match="no latent statistics"):
        load_latent_stats(tmp_path / "missing")
    (tmp_path / "s.txt").write_text("1 2")
    with pytest.raises(ValueError, match=".json, .npz or .pt"):
        load_latent_stats(tmp_path / "s.txt")


def test_bad_combinations_are_refused():
    z = torch.randn(12, 3, 2, 2)
    kw = dict(num_points=10, num_runs=1, perplexity=3.0)
    with pytest.raises(ValueError, match="needs latents_flip"):
        evaluate_latents(None, None, latents=z, flip=True, **kw)
    with pytest.raises(ValueError, match="pooled protocol draws no mirrored"):
        evaluate_latents(None, None, latents=z, latents_flip=z, protocol="pooled", **kw)
    with pytest.raises(ValueError, match="pooled protocol draws no mirrored"):
        evaluate_latents(None, None, latents=z, protocol="pooled", flip=True, **kw)
    with pytest.raises(ValueError, match="unmirrored"):
        evaluate_latents(None, None, latents_flip=z, **kw)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_latents(None, None, latents=z, protocol="va-vae", **kw)
    with pytest.raises(ValueError, match="too few points.*protocol='pooled'"):  # 2 images: 2 points
        evaluate_latents(None, None, latents=torch.randn(2, 3, 4, 4), **kw)


def test_eval_latents_cli(tmp_path, capsys):
    torch.manual_seed(0)
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    c = 8  # the tiny preset's latent channels
    np.savez(tmp_path / "stats.npz", mean=np.zeros(c), std=np.full(c, 2.0))
    common = ["eval", "latents", "--checkpoint", str(tmp_path / "tok"), "--num-images", "12", "--num-points", "12",
              "--runs", "1", "--iterations", "250"]
    assert main(common + ["--train-stats", str(tmp_path / "stats.npz"), "--out", str(tmp_path / "a")]) == 0
    assert "protocol vavae, flips on, normalised by the training statistics" in capsys.readouterr().out
    saved = json.loads((tmp_path / "a" / "latents.json").read_text())
    assert (saved["protocol"], saved["flip"], saved["normalization"]) == ("vavae", True, "train")
    assert saved["train_stats_source"] == str(tmp_path / "stats.npz") and saved["num_points"] == 12
    assert (tmp_path / "a" / "tsne.png").is_file()
    assert main(common + ["--protocol", "pooled", "--out", str(tmp_path / "b")]) == 0
    saved = json.loads((tmp_path / "b" / "latents.json").read_text())
    assert (saved["protocol"], saved["flip"], saved["normalization"]) == ("pooled", False, "eval-set")
    assert "own statistics" in capsys.readouterr().out
    assert main(common + ["--no-flip", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "latents.json").read_text())["flip"] is False
