"""One loader for every model family: model folders, checkpoints, run folders, EMA, expected types."""

import pytest
import torch
from safetensors.torch import save_file

from hieratok import HieraTok
from hieratok.generators.dit import DiT
from hieratok.generators.llamagen import GPT
from hieratok.registry import DIFFUSERS_VAE, GENERATORS, MODEL_TYPES, TOKENIZERS, load_model, model_class
from hieratok.tokenizers.restok import ResTok


def small_models():
    return {"hieratok": HieraTok.from_preset("tiny", image_size=32, encoder_depth=1, decoder_depth=1),
            "restok": ResTok.from_preset("restok-tiny"),
            "dit": DiT.from_preset("dit-tiny", depth=1),
            "llamagen-gpt": GPT(GPT.preset_config("gpt-tiny"))}


def test_every_registered_type_names_its_class():
    # a diffusers AutoencoderKL is a tokenizer loaded through "diffusers:<dir>", not from a model folder
    assert set(MODEL_TYPES) | {DIFFUSERS_VAE} == set(TOKENIZERS) | set(GENERATORS) and DIFFUSERS_VAE not in MODEL_TYPES
    for kind in MODEL_TYPES:
        assert model_class(kind).model_type == kind
    with pytest.raises(ValueError, match="unknown model_type 'vae'"):
        model_class("vae")


@pytest.mark.parametrize("kind", sorted(MODEL_TYPES))
def test_load_model_builds_the_saved_family_in_eval_mode_with_its_weights(kind, tmp_path):
    torch.manual_seed(0)
    m = small_models()[kind]
    m.save_pretrained(tmp_path / "m")
    loaded, info = load_model(tmp_path / "m")
    assert type(loaded) is type(m) and not loaded.training
    assert info["model_type"] == kind and info["weights"] == "model" and info["train_config"] == {}
    for (k, a), b in zip(m.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    other = GENERATORS if kind in TOKENIZERS else TOKENIZERS
    with pytest.raises(ValueError, match=f"model_type '{kind}' is not one of"):
        load_model(tmp_path / "m", expect=other)


def test_checkpoints_and_runs_resolve_to_the_latest_checkpoint_with_ema(tmp_path):
    m = small_models()["hieratok"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    m.save_pretrained(ckpt)
    save_file({k: torch.zeros_like(p) for k, p in m.named_parameters()}, str(ckpt / "ema.safetensors"))
    (ckpt / "trainer_state.json").write_text('{"step": 2, "train_config": {"preset": "tiny"}}')
    loaded, info = load_model(tmp_path / "run")
    assert info["model_dir"] == str(ckpt) and info["weights"] == "ema" and info["train_config"] == {"preset": "tiny"}
    assert all((p == 0).all() for p in loaded.parameters())
    _, info = load_model(tmp_path / "run", ema=False)
    assert info["weights"] == "model"
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a model folder"):
        load_model(tmp_path / "empty")


@pytest.mark.parametrize("kind", sorted(MODEL_TYPES))
def test_one_preset_convention_for_every_family(kind):
    from hieratok import presets

    cls = model_class(kind)
    names = cls.preset_names()
    assert names and names == sorted(cls.presets) and cls.presets in (
        presets.HIERATOK_PRESETS, presets.RESTOK_PRESETS, presets.DIT_PRESETS, presets.GPT_PRESETS)
    small = min(names, key=lambda n: ("tiny" not in n, n))
    cfg = cls.preset_config(small)
    assert isinstance(cfg, cls.config_class)
    for key, value in cls.presets[small].items():
        got = getattr(cfg, key)
        assert (list(got) if isinstance(got, tuple) else got) == (list(value) if isinstance(value, tuple) else value)
    with pytest.raises(ValueError, match=f"unknown {cls.__name__} preset 'nope'; choose one of"):
        cls.preset_config("nope")
