"""Cache -> train -> sample -> evaluate, for a DiT on HieraTok latents and a HAR GPT on ResTok codes."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.data import EmbeddedPhotos
from hieratok.data.latent_cache import LatentCacheDataset
from hieratok.tokenizers import ResTok
from hieratok.train import Trainer, load_config
from hieratok.workflows.generation import cache_latents, sample_to_folder

FAST = {"adapt_threads": False,  # fixed threads: trajectories are compared bit for bit
        "progress": False, "tensorboard": False, "log_every": 1, "image_every": 0, "ckpt_every": 0, "batch_size": 16}


@pytest.fixture(scope="module")
def dit_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    torch.manual_seed(0)
    HieraTok.from_preset("tiny", encoder_depth=1, decoder_depth=1).save_pretrained(root / "tok")
    meta = cache_latents(str(root / "tok"), None, str(root / "cache"), flip=True, num=48, shard_size=16, progress=False)
    cfg = load_config(overrides={**FAST, "task": "dit", "preset": "dit-tiny", "data.path": str(root / "cache"),
                                 "out_dir": str(root / "dit"), "steps": 40, "optim.lr": 1e-3, "optim.end_lr": 1e-3,
                                 "image_every": 40, "sample_count": 4, "objective.sampling_steps": 5})
    hist = Trainer(cfg).fit()
    return root, meta, hist


def test_cache_contents_flips_and_statistics(dit_setup):
    root, meta, _ = dit_setup
    assert meta["num"] == 96 and meta["shape"] == [8, 8, 8] and meta["kind"] == "latents" and len(meta["shards"]) == 3
    ds = LatentCacheDataset(root / "cache")
    tok = HieraTok.from_pretrained(root / "tok").eval()
    photos = EmbeddedPhotos("train", 64, length=48, seed=0, hflip=False, short_side=128)
    x, y = photos[5]
    with torch.no_grad():
        z, zf = tok.encode(torch.stack([x, x.flip(-1)])).mode()
    torch.testing.assert_close(ds[10][0], z, rtol=1e-5, atol=1e-5)  # item 5, then its mirror
    torch.testing.assert_close(ds[11][0], zf, rtol=1e-5, atol=1e-5)
    assert ds[10][1] == ds[11][1] == y
    allz = torch.stack([ds[i][0] for i in range(len(ds))]).double()
    np.testing.assert_allclose(meta["mean"], allz.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(meta["std"], allz.std(dim=(0, 2, 3), unbiased=False).numpy(), rtol=1e-6)


def test_cache_resumes_missing_shards_only(dit_setup, tmp_path):
    root, _, _ = dit_setup
    import shutil

    shutil.copytree(root / "cache", tmp_path / "cache")
    before = (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns
    (tmp_path / "cache" / "shard-00001.safetensors").unlink()
    meta = cache_latents(str(root / "tok"), None, str(tmp_path / "cache"), flip=True, num=48, shard_size=16, progress=False)
    assert meta["num"] == 96 and (tmp_path / "cache" / "shard-00000.safetensors").stat().st_mtime_ns == before
    a = load_file(str(root / "cache" / "shard-00001.safetensors"))
    b = load_file(str(tmp_path / "cache" / "shard-00001.safetensors"))
    torch.testing.assert_close(a["latents"], b["latents"])


def test_dit_trains_on_cached_latents_and_keeps_statistics(dit_setup):
    root, meta, hist = dit_setup
    first = np.mean([h["loss"] for h in hist[:5]])
    last = np.mean([h["loss"] for h in hist[-5:]])
    assert last < 0.9 * first, (first, last)
    cfg = json.loads((root / "dit" / "checkpoints" / "step_00000040" / "config.json").read_text())
    assert cfg["latent_mean"] == pytest.approx(meta["mean"]) and cfg["in_channels"] == 8 and cfg["num_classes"] == 11
    assert (root / "dit" / "images" / "samples_00000040.png").is_file()


def test_sampling_is_deterministic_and_npz_round_trips(dit_setup, tmp_path):
    root, _, _ = dit_setup
    kw = dict(num=5, batch_size=2, steps=4, progress=False)
    a = sample_to_folder(str(root / "dit"), str(tmp_path / "a"), seed=3, all_scales=True, **kw)
    b = sample_to_folder(str(root / "dit"), str(tmp_path / "b"), seed=3, **kw)
    c = sample_to_folder(str(root / "dit"), str(tmp_path / "c"), seed=4, **kw)
    A, B, C = (np.load(p)["arr_0"] for p in (a, b, c))
    assert A.shape == (5, 64, 64, 3) and A.dtype == np.uint8
    assert np.array_equal(A, B) and not np.array_equal(A, C)
    assert np.array_equal(A[2], np.asarray(Image.open(tmp_path / "a" / "images" / "000002.png")))
    assert np.load(a)["arr_1"].tolist() == [0, 1, 2, 3, 4]
    assert len(list((tmp_path / "a" / "pyramids").glob("*.png"))) == 5


def test_sampling_resumes_after_a_kill_and_refuses_other_settings(dit_setup, tmp_path, monkeypatch):
    """A run killed inside a PNG write leaves no truncated image; the resumed folder equals a clean
    run; resuming with another seed or cfg is refused with the differing keys named."""
    root, _, _ = dit_setup
    kw = dict(num=5, batch_size=2, steps=4, progress=False)
    gen = str(root / "dit")
    clean = np.load(sample_to_folder(gen, str(tmp_path / "clean"), seed=3, **kw))["arr_0"]
    real_save, calls = Image.Image.save, []

    def dying_save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:  # the third image: half a file, then the process dies
            with open(fp, "wb") as f:
                f.write(b"\x89PNG\r\n")
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        sample_to_folder(gen, str(tmp_path / "run"), seed=3, **kw)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "run" / "images").glob("*.png")) == ["000000.png", "000001.png"]
    resumed = np.load(sample_to_folder(gen, str(tmp_path / "run"), seed=3, **kw))["arr_0"]
    assert np.array_equal(resumed, clean)
    with pytest.raises(ValueError, match="seed") as e:
        sample_to_folder(gen, str(tmp_path / "run"), seed=4, cfg_scale=2.0, **kw)
    assert "cfg_scale" in str(e.value) and "num" not in str(e.value).split("(")[1]
    assert json.loads((tmp_path / "run" / "sampling.json").read_text())["seed"] == 3  # nothing overwritten
    # more samples with the same settings is a resume, not a conflict
    more = np.load(sample_to_folder(gen, str(tmp_path / "run"), seed=3, **{**kw, "num": 6}))["arr_0"]
    assert np.array_equal(more[:4], clean[:4]) and more.shape[0] == 6
    (tmp_path / "run" / "sampling.json").unlink()
    with pytest.raises(ValueError, match="sampling.json"):
        sample_to_folder(gen, str(tmp_path / "run"), seed=3, **kw)


def _sample_worker(rank: int, port: int, gen: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    sample_to_folder(gen, out, num=5, batch_size=2, steps=4, seed=3, progress=False)
    torch.distributed.destroy_process_group()


def test_two_ranks_sample_the_same_images_as_one(dit_setup, tmp_path):
    root, _, _ = dit_setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_sample_worker, args=(port, str(root / "dit"), str(tmp_path / "two")), nprocs=2, join=True,
                       start_method="spawn")
    one = sample_to_folder(str(root / "dit"), str(tmp_path / "one"), num=5, batch_size=2, steps=4, seed=3, progress=False)
    a = np.load(one)["arr_0"].astype(int)
    b = np.load(tmp_path / "two" / "samples.npz")["arr_0"].astype(int)
    # same seeds per batch: the same images (up to 8-bit rounding of float sums under other thread counts)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01, (np.abs(a - b).max(), (a != b).mean())


def test_har_gpt_on_restok_codes(tmp_path):
    """Ten-crop code extraction (the release's), then HAR training on one view per access, then sampling."""
    from safetensors.torch import load_file

    from hieratok.data import EmbeddedPhotos
    from hieratok.data.latent_cache import LatentCacheDataset
    from hieratok.data.transforms import ten_crop

    torch.manual_seed(0)
    tok = ResTok.from_preset("restok-tiny").eval()
    tok.save_pretrained(tmp_path / "tok")
    meta = cache_latents(str(tmp_path / "tok"), None, str(tmp_path / "codes"), num=32, progress=False, ten_crop=True)
    assert meta["kind"] == "codes" and meta["shape"] == [32] and meta["codebook_size"] == 256
    assert meta["views"] == 10 and meta["ten_crop"]["crop_size"] == 70  # int(64 * 1.1)
    codes = load_file(str(tmp_path / "codes" / meta["shards"][0]))["codes"]
    assert codes.shape == (32, 10, 32)
    x = EmbeddedPhotos("train", 70, length=32, seed=0, hflip=False, short_side=128)[3][0]
    with torch.no_grad():  # the stored centre view (index 4) is the code of the centre 64 x 64 crop
        assert torch.equal(codes[3, 4], tok.encode_indices(ten_crop(x[None], 64)[0, 4:5])[0])
    assert meta["code_range"] == [int(codes.min()), int(codes.max())]
    with pytest.raises(ValueError, match=r"do not fit a GPT with vocab_size 100"):  # checked once, before training
        Trainer(load_config(overrides={**FAST, "task": "ar", "preset": "gpt-tiny", "data.path": str(tmp_path / "codes"),
                                       "model.vocab_size": 100, "out_dir": str(tmp_path / "bad")}))
    ds = LatentCacheDataset(tmp_path / "codes")
    item, label = ds[3]
    assert item.shape == (32,) and any(torch.equal(item, codes[3, v]) for v in range(10))
    cfg = load_config(overrides={**FAST, "task": "ar", "preset": "gpt-tiny", "data.path": str(tmp_path / "codes"),
                                 "out_dir": str(tmp_path / "har"), "steps": 30, "optim.lr": 3e-3, "optim.end_lr": 3e-3})
    hist = Trainer(cfg).fit()
    assert hist[-1]["loss"] < hist[0]["loss"]
    npz = sample_to_folder(str(tmp_path / "har"), str(tmp_path / "s"), num=3, batch_size=2, progress=False)
    assert np.load(npz)["arr_0"].shape == (3, 64, 64, 3)
    # N comes from the tokenizer, so sampling works without the code cache (it used to fall back to 128)
    import shutil

    shutil.rmtree(tmp_path / "codes")
    again = sample_to_folder(str(tmp_path / "har"), str(tmp_path / "s2"), tokenizer=str(tmp_path / "tok"), num=3,
                             batch_size=2, progress=False)
    assert np.array_equal(np.load(again)["arr_0"], np.load(npz)["arr_0"])


def test_generator_task_without_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="hieratok cache-latents"):
        Trainer(load_config(overrides={**FAST, "task": "dit", "preset": "dit-tiny"}))


def _matmul_layers(model: torch.nn.Module) -> int:
    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())


def test_sampling_and_caching_precision(dit_setup, tmp_path):
    """fp32 is the CPU default bit for bit; bf16 runs, is recorded, and stays within the bound derived in
    tests/test_precision.py: relative RMS error sqrt(L) * 2^-7 through L matmul layers (generator and
    decoder add theirs). Measured: samples 0.3 levels mean |difference|, latents 0.005 relative."""
    from hieratok.registry import load_model

    root, _, _ = dit_setup
    kw = dict(num=4, batch_size=4, steps=4, progress=False, seed=1)
    a = sample_to_folder(str(root / "dit"), str(tmp_path / "a"), **kw)
    b = sample_to_folder(str(root / "dit"), str(tmp_path / "b"), precision="fp32", **kw)
    c = sample_to_folder(str(root / "dit"), str(tmp_path / "c"), precision="bf16", **kw)
    A, B, C = (np.load(p)["arr_0"].astype(np.float64) for p in (a, b, c))
    assert np.array_equal(A, B)
    assert json.loads((tmp_path / "c" / "sampling.json").read_text())["precision"] == "bf16"
    tok = HieraTok.from_pretrained(root / "tok")
    dit = load_model(str(root / "dit"))[0]
    rel_bound = (np.sqrt(_matmul_layers(tok)) + np.sqrt(_matmul_layers(dit))) * 2.0**-7
    assert np.sqrt(((A - C) ** 2).mean()) <= rel_bound * np.sqrt(((A - 127.5) ** 2).mean())
    for prec in ("fp32", "bf16"):
        meta = cache_latents(str(root / "tok"), None, str(tmp_path / f"cache_{prec}"), num=8, shard_size=16,
                             progress=False, precision=prec)
        assert meta["precision"] == prec
    z32, z16 = (load_file(str(tmp_path / f"cache_{p}" / "shard-00000.safetensors"))["latents"] for p in ("fp32", "bf16"))
    assert z16.dtype == torch.float32  # stored as float32 whatever the arithmetic
    rel = ((z16 - z32).pow(2).mean().sqrt() / z32.pow(2).mean().sqrt()).item()
    assert 0 < rel <= np.sqrt(_matmul_layers(tok)) * 2.0**-7
