import json

import pytest
import torch
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.hub import CONFIG_NAME, WEIGHTS_NAME

TINY = dict(image_size=32, decoder_depth=1, encoder_depth=1)


def test_round_trip_identical_outputs(tmp_path, gen):
    m = HieraTok.from_preset("tiny", **TINY).eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG_NAME).is_file() and (tmp_path / WEIGHTS_NAME).is_file()
    assert not list(tmp_path.glob("*.tmp"))
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["model_type"] == "hieratok" and cfg["scales"] == [1, 2, 4]
    # the weights file is plain safetensors (no pickle) with every parameter
    assert set(load_file(str(tmp_path / WEIGHTS_NAME))) == set(m.state_dict())
    m2 = HieraTok.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    with torch.no_grad():
        for a, b in zip(m(x)["reconstructions"], m2(x)["reconstructions"]):
            assert torch.equal(a, b)


def test_runtime_override_allowed(tmp_path):
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    m = HieraTok.from_pretrained(tmp_path, attn_backend="reference", decoder_drop_path=0.0, init_std=0.01)
    assert m.config.attn_backend == "reference"
    backends = {mod.backend for mod in m.modules() if hasattr(mod, "backend")}
    assert backends == {"reference"}  # every attention layer, not only the config field


def test_architecture_override_names_the_field(tmp_path):
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"scales: checkpoint \(1, 2, 4\) vs requested \(1, 4\)"):
        HieraTok.from_pretrained(tmp_path, scales=(1, 4))


def test_fields_a_config_does_not_use_are_not_compared(tmp_path):
    HieraTok.from_preset("tiny-single", **TINY).save_pretrained(tmp_path / "single")
    m = HieraTok.from_pretrained(tmp_path / "single", downsample="interp", attention="full", downsample_width=8)
    assert m.downsampler is None
    HieraTok.from_preset("tiny", **TINY, downsample="interp").save_pretrained(tmp_path / "interp")
    HieraTok.from_pretrained(tmp_path / "interp", downsample_width=8)
    with pytest.raises(ValueError, match="downsample: checkpoint 'interp' vs requested 'conv'"):
        HieraTok.from_pretrained(tmp_path / "interp", downsample="conv")
    with pytest.raises(ValueError, match="attention"):
        HieraTok.from_pretrained(tmp_path / "interp", attention="full")


def test_loading_into_other_config_names_the_mismatch(tmp_path):
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    other = HieraTok.from_preset("tiny-single", **TINY)
    with pytest.raises(ValueError, match="multiscale: checkpoint True vs model False"):
        other.load_pretrained_weights(tmp_path)


def test_tampered_weights_name_the_tensor(tmp_path):
    m = HieraTok.from_preset("tiny", **TINY)
    m.save_pretrained(tmp_path)
    sd = load_file(str(tmp_path / WEIGHTS_NAME))
    sd["decoder.head.weight"] = sd["decoder.head.weight"][:10]
    del sd["encoder.norm.bias"]
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(ValueError) as e:
        HieraTok.from_pretrained(tmp_path)
    assert "encoder.norm.bias" in str(e.value) and "decoder.head.weight" in str(e.value)


def test_missing_dir_and_wrong_model_type(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        HieraTok.from_pretrained(tmp_path / "nope" / "deeper")
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"model_type": "dit"}))
    with pytest.raises(ValueError, match="model_type is 'dit'"):
        HieraTok.from_pretrained(tmp_path)


def test_repo_ids_resolve_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, **kw):
        seen.update(kw, repo_id=repo_id)
        raise huggingface_hub.utils.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such Hub repo in the local cache"):
        HieraTok.from_pretrained("owner/model")
    assert seen["repo_id"] == "owner/model" and seen["local_files_only"] is True


def test_corrupt_files_and_unknown_overrides_are_one_line_errors(tmp_path):
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unknown HieraTokConfig field"):
        HieraTok.from_pretrained(tmp_path, attn_backnd="reference")
    w = tmp_path / WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])  # a truncated copy
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        HieraTok.from_pretrained(tmp_path)
    w.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        HieraTok.from_pretrained(tmp_path)
    cfg = tmp_path / CONFIG_NAME
    cfg.write_text(cfg.read_text()[:30])
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        HieraTok.from_pretrained(tmp_path)
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        HieraTok.from_pretrained(tmp_path)


def test_absurd_config_is_refused_from_the_header_before_any_model_is_built(tmp_path, monkeypatch):
    """A config.json claiming 10M decoder blocks must not build anything (it took 5.6 GB before)."""
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    n_tensors = len(load_file(str(tmp_path / WEIGHTS_NAME)))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "decoder_depth": 10_000_000}))

    def no_build(*a, **k):
        raise AssertionError("a model was built")

    monkeypatch.setattr(HieraTok, "__init__", no_build)
    with pytest.raises(ValueError, match=f"decoder_depth=10000000 .* holds {n_tensors} tensors"):
        HieraTok.from_pretrained(tmp_path)


def test_foreign_widths_are_found_on_the_meta_device_before_allocating(tmp_path, monkeypatch):
    HieraTok.from_preset("tiny", **TINY).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**cfg, "decoder_width": cfg["decoder_width"] * 2}))
    built_on = []
    init = HieraTok.__init__

    def spy(self, *a, **k):
        built_on.append(torch.empty(0).device.type)  # the default device while the model is built
        init(self, *a, **k)

    monkeypatch.setattr(HieraTok, "__init__", spy)
    with pytest.raises(ValueError, match="do not fit the config: .*shape mismatch"):
        HieraTok.from_pretrained(tmp_path)
    assert built_on == ["meta"]
