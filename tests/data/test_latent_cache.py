"""Latent caches: a folder holds one cache, made with one set of settings."""

import json

import pytest
import torch

from hieratok.data.latent_cache import CACHE_PLAN, LatentCacheDataset, finalize_cache, write_cache


def _items(n, offset=0.0):
    return [(torch.full((2, 1, 1), float(i) + offset), i % 2) for i in range(n)]


def test_resume_with_other_settings_is_refused_and_nothing_mixes(tmp_path):
    out = tmp_path / "cache"
    write_cache(lambda x: x, _items(10), out, shard_size=4, progress=False, source={"tokenizer": "a"})
    (out / "shard-00001.safetensors").unlink()  # interrupted
    before = sorted(p.name for p in out.iterdir())
    for kw, field in (({"source": {"tokenizer": "b"}}, "tokenizer: 'a' -> 'b'"), ({"flip": True}, "flip"),
                      ({"shard_size": 5}, "shard_size: 4 -> 5")):
        with pytest.raises(ValueError, match=field):
            write_cache(lambda x: x, _items(10, 100.0), out, progress=False, **{"shard_size": 4, "source": {"tokenizer": "a"}, **kw})
        assert sorted(p.name for p in out.iterdir()) == before  # nothing written
    with pytest.raises(ValueError, match="num_items: 10 -> 8"):
        write_cache(lambda x: x, _items(8), out, shard_size=4, progress=False, source={"tokenizer": "a"})
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        finalize_cache(out, {})
    # the same settings resume: only the missing shard is written, and the cache is the full one
    written = write_cache(lambda x: x, _items(10), out, shard_size=4, progress=False, source={"tokenizer": "a"})
    assert [p.name for p in written] == ["shard-00001.safetensors"]
    meta = finalize_cache(out, {})
    assert meta["num"] == 10 and meta["shards"] == [f"shard-0000{k}.safetensors" for k in range(3)]
    ds = LatentCacheDataset(out)
    assert [float(ds[i][0][0, 0, 0]) for i in range(10)] == list(range(10))


def test_a_stray_shard_is_not_collected(tmp_path):
    out = tmp_path / "cache"
    write_cache(lambda x: x, _items(4), out, shard_size=4, progress=False)
    (out / "shard-00007.safetensors").write_bytes((out / "shard-00000.safetensors").read_bytes())
    assert finalize_cache(out, {})["num"] == 4
    assert json.loads((out / CACHE_PLAN).read_text())["num_items"] == 4


def test_shards_without_a_plan_are_refused(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "shard-00000.safetensors").write_bytes(b"old")
    with pytest.raises(ValueError, match="without a cache_plan.json"):
        write_cache(lambda x: x, _items(4), out, progress=False)


def test_code_ranges_are_recorded_and_checked_once(tmp_path):
    items = [(torch.tensor([i, 2 * i]), i % 2) for i in range(5)]
    write_cache(lambda x: x, items, tmp_path / "c", kind="codes", shard_size=2, progress=False)
    assert finalize_cache(tmp_path / "c", {"codebook_size": 9})["code_range"] == [0, 8]
    with pytest.raises(ValueError, match=r"codes span \[0, 8\], outside the codebook \[0, 8\)"):
        finalize_cache(tmp_path / "c", {"codebook_size": 8})
    write_cache(lambda x: x, [(torch.tensor([0]), -1)], tmp_path / "n", kind="codes", progress=False)
    with pytest.raises(ValueError, match="negative class label -1"):
        finalize_cache(tmp_path / "n", {})
