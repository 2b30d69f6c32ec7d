import json

import numpy as np
import pytest
from PIL import Image

from hieratok import HieraTok
from hieratok.cli import main
from hieratok.demo import DemoConfig, run_demo


def test_demo_end_to_end_small_budget(tmp_path):
    cfg = DemoConfig(steps=2, out=str(tmp_path / "demo"), batch_size=4, eval_crops_per_photo=2, tsne_points=60,
                     tsne_runs=1, progress=False)
    res = run_demo(cfg)
    out = tmp_path / "demo"
    for f in ["report.html", "report.md", "reconstructions.png", "pyramid.png", "loss_curves.png", "tsne_multi.png",
              "tsne_single.png", "psnr_per_scale.png", "metrics.json"]:
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and m["multi"]["num_images"] == m["single"]["num_images"] == 6
    assert list(m["multi"]["psnr_per_scale"]) == ["8", "16", "32", "64"] and len(m["single"]["psnr_per_scale"]) == 1
    text = res["table"].to_text()
    assert "single-scale (baseline)" in text and "multi-scale" in text and "density CV" in text
    html = (out / "report.html").read_text()
    assert "not LPIPS" in html and "tsne_multi.png" in html
    # both twins saw the same data: same number of steps and identical encoder architecture
    assert (out / "multi" / "metrics.csv").read_text().count("\n") == (out / "single" / "metrics.csv").read_text().count("\n")


def test_demo_time_budget_leaves_the_real_runs_their_whole_schedule(tmp_path):
    """Calibration runs on throw-away trainers: the real runs start at step 0 with the warm-up LR."""
    import time

    from hieratok.demo import _data_text, _train
    from hieratok.train import lr_at

    c = DemoConfig(minutes=0.0, eval_reserve_s=-8.0, out=str(tmp_path / "demo"), batch_size=2, progress=False)
    trainers = _train(c, time.perf_counter())  # about 8 s of budget after the calibration
    steps = trainers["multi"].step
    assert steps >= 1 and trainers["single"].step == steps
    for t in trainers.values():
        assert t.cfg.steps == steps and t.history[-1]["step"] == steps
        assert t.history[0]["step"] == min(5, steps)  # no calibration rows in the run's log (log_every=5)
        o = t.cfg.optim
        assert t.history[0]["lr"] == pytest.approx(sum(lr_at(s, steps, o.lr, o.end_lr, o.warmup_ratio)
                                                      for s in range(min(5, steps))) / min(5, steps), rel=1e-5)
    assert _data_text(DemoConfig()) == "the embedded photos" and "my/imgs" in _data_text(DemoConfig(data="my/imgs"))


def test_reconstruct_crop_and_tile(tmp_path, capsys):
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert main(["reconstruct", str(tmp_path / "photo.jpg"), str(tmp_path / "gray.png"), "--checkpoint",
                 str(tmp_path / "tok")]) == 0
    assert Image.open(tmp_path / "photo.recon.png").size == (64, 64)
    assert Image.open(tmp_path / "photo.pyramid.png").size[0] > 64
    assert main(["reconstruct", str(tmp_path / "photo.jpg"), "--checkpoint", str(tmp_path / "tok"), "--mode", "tile",
                 "--out", str(tmp_path / "tiles")]) == 0
    assert Image.open(tmp_path / "tiles" / "photo.recon.png").size == (150, 100)  # the whole image, own size


def test_tile_mode_is_the_crop_reconstruction_of_each_tile():
    import torch

    from hieratok.reconstruct import reconstruct_image

    torch.manual_seed(0)
    model = HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).eval()
    x = torch.rand(3, 100, 150) * 2 - 1  # 2 x 3 tiles of 64; the last row and column reach into the padding
    xp = torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 28), (0, 42)), mode="reflect"))
    tiled = reconstruct_image(model, x, "tile", batch_size=4)
    assert [tuple(t.shape) for t in tiled] == [(3, round(100 * s / 64), round(150 * s / 64)) for s in (8, 16, 32, 64)]
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 2)):
        crop = reconstruct_image(model, xp[:, 64 * i:64 * (i + 1), 64 * j:64 * (j + 1)], "crop")
        for t, c in zip(tiled, crop):
            s = c.shape[-1]
            want = c[:, : t.shape[1] - s * i, : t.shape[2] - s * j]  # the part inside the image
            torch.testing.assert_close(t[:, s * i:s * (i + 1), s * j:s * (j + 1)], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("content,match", [(None, "no such file"), (b"not an image", "cannot read image")])
def test_reconstruct_bad_input_is_one_line(tmp_path, capsys, content, match):
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(tmp_path / "tok")
    f = tmp_path / "x.jpg"
    if content is not None:
        f.write_bytes(content)
    assert main(["reconstruct", str(f), "--checkpoint", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
