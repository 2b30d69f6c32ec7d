import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio

from hieratok import HieraTok
from hieratok.cli import main
from hieratok.data import EmbeddedPhotos
from hieratok.evaluate import ReconEvalConfig, compare_runs, evaluate_latents, evaluate_reconstruction
from hieratok.evaluate.recon import write_recon_report
from hieratok.metrics import GaussianStats
from hieratok.registry import load_model

TINY = dict(encoder_depth=1, decoder_depth=1)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    torch.manual_seed(0)
    HieraTok.from_preset("tiny", **TINY).save_pretrained(d)
    return d


def test_recon_eval_matches_independent_psnr_and_writes_report(tok_dir, tmp_path):
    model, info = load_model(tok_dir)
    assert info["weights"] == "model"
    res = evaluate_reconstruction(model, ReconEvalConfig(num=6, batch_size=4, perceptual="effnet-lite0", progress=False))
    assert res["num_images"] == 6 and res["perceptual_name"] == "effnet-lite0-perceptual"
    assert "lpips" not in json.dumps({k: v for k, v in res.items() if k != "samples"}).lower().replace("not lpips", "")
    # independent PSNR: scikit-image on the same uint8 images (6 of the 12 crops, evenly spaced)
    ds = EmbeddedPhotos("heldout", 64)
    x = torch.stack([ds[i][0] for i in range(0, 12, 2)])
    with torch.no_grad():
        rec = model.decode(model.encode(x).mode())
    u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    ref = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(u8(x), u8(rec))])
    assert res["psnr"] == pytest.approx(ref, abs=1e-6)
    assert list(res["psnr_per_scale"]) == [8, 16, 32, 64]
    assert res["psnr_per_scale"][64] == pytest.approx(res["psnr"], abs=1e-9)  # same uint8 images
    assert np.isfinite(res["rfid"]) and res["rfid"] > 0 and "fid-helper" in res["inception_source"]
    report = write_recon_report(res, tmp_path / "eval")
    assert report.is_file() and (tmp_path / "eval" / "reconstructions.png").is_file()
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["psnr"] == pytest.approx(res["psnr"]) and "samples" not in saved


def test_load_model_prefers_ema(tok_dir, tmp_path):
    m = HieraTok.from_pretrained(tok_dir)
    ckpt = tmp_path / "ckpt"
    m.save_pretrained(ckpt)
    ema = {k: torch.zeros_like(v) for k, v in m.named_parameters()}
    save_file(ema, str(ckpt / "ema.safetensors"))
    loaded, info = load_model(ckpt)
    assert info["weights"] == "ema" and all((p == 0).all() for p in loaded.parameters())
    raw, info = load_model(ckpt, ema=False)
    assert info["weights"] == "model" and any((p != 0).any() for p in raw.parameters())
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_model(tmp_path / "missing")


def test_latent_uniformity_eval(tok_dir, tmp_path):
    model, _ = load_model(tok_dir)
    res = evaluate_latents(model, None, num_images=8, num_points=200, num_runs=2, iterations=250, out_dir=tmp_path)
    assert res["num_runs"] == 2 and 0 <= res["gini"] <= 1 and 0 < res["normalized_entropy"] <= 1
    assert (tmp_path / "tsne.png").is_file() and res["latent_shape"] == [8, 8, 8]


def test_eval_fid_cli_on_statistics_files(tmp_path, capsys):
    a = GaussianStats(np.zeros(4), np.eye(4), 10, "a")
    b = GaussianStats(np.ones(4), 4 * np.eye(4), 10, "b")
    a.save(tmp_path / "a.npz")
    b.save(tmp_path / "b.npz")
    assert main(["eval", "fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fid"] == pytest.approx(4 * 1 + 4 * (2 - 1) ** 2)  # |mu|^2 + tr(S1 + S2 - 2 sqrt(S1 S2))
    assert out["inception_source"] == "none"


def test_compare_table_layout(tmp_path):
    (tmp_path / "single").mkdir()
    (tmp_path / "multi").mkdir()
    (tmp_path / "single" / "metrics.json").write_text(json.dumps({"rfid": 1.47, "psnr": 24.4, "ssim": 0.74, "gfid": 16.4}))
    (tmp_path / "multi" / "metrics.json").write_text(json.dumps({"rfid": 1.07, "psnr": 23.8, "ssim": 0.72, "gfid": 13.3}))
    t = compare_runs([tmp_path / "single", tmp_path / "multi"])
    text = t.to_markdown()
    assert "1.07 (-0.40)" in text and "23.80 (-0.60)" in text and "13.30 (-3.10)" in text
    assert "IS" not in [h.strip(" ↑↓") for h in text.splitlines()[0].split("|")]
    with pytest.raises(FileNotFoundError, match="hieratok eval"):
        compare_runs([tmp_path])


def test_restok_recon_eval_reports_codebook_statistics():
    import math
    from collections import Counter

    from hieratok.tokenizers import ResTok

    torch.manual_seed(0)
    model = ResTok.from_preset("restok-tiny").eval()
    res = evaluate_reconstruction(model, ReconEvalConfig(num=4, batch_size=2, perceptual="none", fid=False, progress=False))
    x = torch.stack([EmbeddedPhotos("heldout", 64)[i][0] for i in range(0, 12, 3)])  # 4 of 12, evenly spaced
    with torch.no_grad():
        idx = model.encode(x)["indices"].flatten().tolist()
    counts = Counter(idx)
    n = len(idx)
    entropy_bits = -sum(c / n * math.log2(c / n) for c in counts.values())
    assert res["codebook_usage"] == pytest.approx(len(counts) / model.config.codebook_size)
    assert res["codebook_entropy_bits"] == pytest.approx(entropy_bits, rel=1e-9)
    assert list(res["psnr_per_scale"]) == [64]


def test_compare_curves_overlays_training_logs(tmp_path, capsys):
    for name, slope in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        rows = "\n".join(f"{s},{1.0 / (1 + slope * s)}" for s in range(1, 20))
        (tmp_path / name / "metrics.csv").write_text("step,loss\n" + rows + "\n")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--curves", str(tmp_path / "c.png")]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "c.png").size[0] > 100
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "zzz"), "--curves", str(tmp_path / "d.png")]) == 2


def _write_pngs(folder, names_and_seeds, size=64):
    """PNG files of random images (one seed each); returns their (3, H, W) tensors in [-1, 1]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in names_and_seeds:
        arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)
        out.append(torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)
    return out


def test_corrupt_image_is_skipped_not_replaced_by_its_neighbour(tok_dir, tmp_path):
    # a.png, b.png, c.png (corrupt), d.png: d must be scored once, c not at all
    x = _write_pngs(tmp_path / "imgs", [("a.png", 0), ("b.png", 1), ("d.png", 3)])
    (tmp_path / "imgs" / "c.png").write_bytes(b"not a png")
    model, _ = load_model(tok_dir)
    res = evaluate_reconstruction(model, ReconEvalConfig(data=str(tmp_path / "imgs"), num=4, batch_size=4,
                                                         perceptual="none", fid=False, progress=False))
    assert res["num_images"] == 3 and res["num_skipped"] == 1
    x = torch.stack(x)
    with torch.no_grad():
        rec = model.decode(model.encode(x).mode())
    u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    ref = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(u8(x), u8(rec))])
    assert res["psnr"] == pytest.approx(ref, abs=1e-9)
    lat = evaluate_latents(model, str(tmp_path / "imgs"), num_images=4, num_points=50, num_runs=1, iterations=250)
    assert lat["num_images"] == 3 and lat["num_skipped"] == 1


def test_eval_subset_spans_all_classes(tok_dir, tmp_path):
    from hieratok.evaluate.latents import encode_latents
    from hieratok.evaluate.recon import eval_indices

    # the property: n evenly spread indices, ranks' shares disjoint, sizes n // world + (r < n % world)
    for length, num, world in [(10, 4, 1), (50_000, 50_000, 3), (12, 5, 2), (7, 100, 4), (1000, 10, 3)]:
        n = min(num, length)
        shares = [eval_indices(length, num, r, world) for r in range(world)]
        assert [len(s) for s in shares] == [n // world + (r < n % world) for r in range(world)]
        merged = sorted(i for s in shares for i in s)
        gaps = np.diff(merged + [length])  # spread over the whole set: no gap wider than ceil(length / n)
        assert len(set(merged)) == n and merged[0] == 0 and gaps.max() <= -(-length // n)
    # two classes of 4 images: 2 evaluation images come one from each class, not both from the first
    imgs = _write_pngs(tmp_path / "cls" / "a", [(f"{i}.png", i) for i in range(4)])
    imgs += _write_pngs(tmp_path / "cls" / "b", [(f"{i}.png", 10 + i) for i in range(4)])
    model, _ = load_model(tok_dir)
    z = encode_latents(model, str(tmp_path / "cls"), 2)
    with torch.no_grad():
        ref = model.encode(torch.stack([imgs[0], imgs[4]])).mode()
    torch.testing.assert_close(z, ref)


def test_fid_false_ignores_a_passed_inception():
    class Boom(torch.nn.Module):
        source = "boom"

        def forward(self, x):
            raise AssertionError("Inception ran although fid=False")

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", **TINY).eval()
    res = evaluate_reconstruction(model, ReconEvalConfig(num=2, perceptual="none", fid=False, progress=False),
                                  inception=Boom())
    assert "rfid" not in res and "inception_source" not in res


def test_compare_finds_eval_of_the_latest_checkpoint(tmp_path):
    # `hieratok eval recon --checkpoint runs/multi` writes runs/multi/checkpoints/<latest>/eval/
    from hieratok.checkpoint import STATE_NAME
    from hieratok.evaluate.compare import load_metrics

    for step, rfid in ((1, 9.0), (2, 1.07)):
        ckpt = tmp_path / "multi" / "checkpoints" / f"step_{step:08d}"
        (ckpt / "eval").mkdir(parents=True)
        (ckpt / STATE_NAME).write_text("{}")
        (ckpt / "eval" / "metrics.json").write_text(json.dumps({"rfid": rfid, "psnr": 23.8}))
    (tmp_path / "multi" / "eval").mkdir()
    (tmp_path / "multi" / "eval" / "gen_metrics.json").write_text(json.dumps({"gfid": 13.3}))
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "metrics.json").write_text(json.dumps({"rfid": 1.47, "psnr": 24.4}))
    assert load_metrics(tmp_path / "multi") == {"rfid": 1.07, "psnr": 23.8, "gfid": 13.3}
    assert "1.07 (-0.40)" in compare_runs([tmp_path / "single", tmp_path / "multi"]).to_markdown()


def test_recon_eval_raises_on_non_finite_reconstructions():
    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", **TINY).eval()
    decode = model.decode
    model.decode = lambda *a, **k: [torch.full_like(p, float("inf")) for p in decode(*a, **k)]  # not clamped to 1
    with pytest.raises(ValueError, match="NaN/Inf"):
        evaluate_reconstruction(model, ReconEvalConfig(num=2, perceptual="none", fid=False, progress=False))


def test_exact_reconstructions_give_a_finite_psnr():
    from hieratok.losses.reconstruction import scale_targets

    class Mode:
        def __init__(self, x):
            self.x = x

        def mode(self):
            return self.x

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", **TINY).eval()
    model.encode = Mode  # a perfect tokenizer: every scale is the input area-downsampled
    model.decode = lambda z, all_scales=True: scale_targets(z, model.output_sides())
    res = evaluate_reconstruction(model, ReconEvalConfig(num=3, perceptual="none", fid=False, progress=False))
    assert res["psnr_exact_matches"] == 3
    assert res["psnr"] == pytest.approx(10 * np.log10(255.0**2 * 3 * 64 * 64), rel=1e-12)
    for side, v in res["psnr_per_scale"].items():
        assert v == pytest.approx(10 * np.log10(255.0**2 * 3 * side * side), rel=1e-12)
    json.dumps(res["psnr_per_scale"], allow_nan=False)


def test_latent_eval_records_the_settings_it_used(caplog):
    z = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))  # 32 positions
    res = evaluate_latents(None, None, latents=z, num_points=200, num_runs=1, iterations=250, perplexity=30.0,
                          protocol="pooled")
    assert (res["num_points"], res["iterations"]) == (32, 250)
    assert res["perplexity"] == pytest.approx(31 / 3)  # capped at (points - 1) / 3
    assert "asked: 200, 30" in caplog.text


def test_colour_error_and_kid(gen):
    """A tokenizer whose reconstruction is the input plus a constant per channel: the colour error is
    that offset (closed form, on the 8-bit images), and KID is the unbiased MMD of the same features."""
    from hieratok.losses.reconstruction import scale_targets
    from hieratok.metrics import InceptionFeatures, polynomial_mmd2
    from hieratok.metrics.image import quantize_to_uint8

    class Mode:
        def __init__(self, x):
            self.x = x

        def mode(self):
            return self.x

    offset = torch.tensor([0.2, -0.1, 0.0]).view(1, 3, 1, 1)
    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", **TINY).eval()
    model.encode = Mode
    model.decode = lambda z, all_scales=True: [t + offset for t in scale_targets(z, model.output_sides())]
    inception = InceptionFeatures()
    res = evaluate_reconstruction(model, ReconEvalConfig(num=4, perceptual="none", fid=False, kid=True, progress=False),
                                  inception=inception)
    ds = EmbeddedPhotos("heldout", 64)
    x = torch.stack([ds[i][0] for i in range(0, 12, 3)])
    xu, ru = quantize_to_uint8(x), quantize_to_uint8(x + offset)
    ref = (ru.double().mean((2, 3)) - xu.double().mean((2, 3))).abs().mean() / 127.5
    assert res["color_error"] == pytest.approx(float(ref), rel=1e-12)
    assert abs(res["color_error"] - 0.1) < 0.01  # the mean offset, less what clamping to [-1, 1] cuts
    with torch.no_grad():
        assert res["rkid"] == pytest.approx(polynomial_mmd2(inception(xu), inception(ru)), rel=1e-6)
    assert "rfid" not in res and res["rkid_std"] == 0.0


def test_recon_eval_at_another_image_size(tok_dir, tmp_path, capsys):
    model, _ = load_model(tok_dir)
    cfg = ReconEvalConfig(num=3, batch_size=3, perceptual="none", fid=False, progress=False, image_size=128)
    res = evaluate_reconstruction(model, cfg)
    # independent: 128 px held-out crops (12 crops, 3 evenly spaced), decoded at 128 px
    ds = EmbeddedPhotos("heldout", 128)
    x = torch.stack([ds[i][0] for i in (0, 4, 8)])
    with torch.no_grad():
        rec = model.decode(model.encode(x).mode())
    u8 = lambda t: ((t.clamp(-1, 1) + 1) * 127.5 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert rec.shape[-1] == 128
    assert res["psnr"] == pytest.approx(np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(u8(x), u8(rec))]), abs=1e-6)
    assert list(res["psnr_per_scale"]) == [16, 32, 64, 128]
    with pytest.raises(ValueError, match="100x100 does not work"):
        evaluate_reconstruction(model, ReconEvalConfig(num=1, perceptual="none", fid=False, progress=False, image_size=100))
    assert main(["eval", "recon", "--checkpoint", str(tok_dir), "--num", "2", "--no-fid", "--perceptual", "none",
                 "--image-size", "96", "--out", str(tmp_path / "e96")]) == 0
    assert "96px" in capsys.readouterr().out
