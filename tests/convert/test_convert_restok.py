"""The converter against the official key layout.

``official_layout`` writes down, from a reading of the authors' ``modeling/restok.py`` and
``modeling/modules/blocks.py`` (Kwai-Kolors/ResTok), the name and shape of every tensor of their
state dict for a given config. The CNN parts carry the same names on both sides (taming's
convention) and are taken from our model. A one-off run against the official module classes
(outside CI) confirmed the same key set for a small configuration.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from hieratok.config import architecture_diff
from hieratok.convert.restok import (
    convert_restok_checkpoint,
    infer_restok_config,
    load_official_restok,
    to_official_state_dict,
)
from hieratok.tokenizers.restok import ResTok, ResTokConfig


def official_layout(cfg: ResTokConfig, cnn: dict[str, torch.Size]) -> dict[str, tuple]:
    D, Dd, d, Z, A = cfg.encoder_width, cfg.decoder_width, cfg.codebook_dim, cfg.cnn_z_channels, cfg.alignment_dim
    V = len(cfg.latent_levels)
    out: dict[str, tuple] = {k: tuple(v) for k, v in cnn.items()}

    def blocks(prefix: str, W: int, depth: int, heads: int) -> None:
        hidden = int(W * cfg.mlp_ratio)
        for i in range(depth):
            p = f"{prefix}.blocks.{i}."
            out.update({p + "norm1.weight": (W,), p + "norm1.bias": (W,), p + "norm2.weight": (W,), p + "norm2.bias": (W,),
                        p + "attn.qkv.weight": (3 * W, W), p + "attn.q_bias": (W,), p + "attn.v_bias": (W,),
                        p + "attn.q_norm.weight": (W // heads,), p + "attn.q_norm.bias": (W // heads,),
                        p + "attn.k_norm.weight": (W // heads,), p + "attn.k_norm.bias": (W // heads,),
                        p + "attn.proj.weight": (W, W), p + "attn.proj.bias": (W,),
                        p + "gamma_1": (W,), p + "gamma_2": (W,),
                        p + "mlp.fc1.weight": (hidden, W), p + "mlp.fc1.bias": (hidden,),
                        p + "mlp.fc2.weight": (W, hidden), p + "mlp.fc2.bias": (W,)})

    out["encoder.patch_embed.weight"], out["encoder.patch_embed.bias"] = (D, Z, 1, 1), (D,)
    for s in range(cfg.hierarchy_stages):
        out[f"encoder.level_embedding.{s}"] = (1, D)
    for lv in range(V):
        out[f"encoder.latent_token_level_embedding.{lv}"] = (1, D)
        out[f"encoder.conv_out.{lv}.weight"], out[f"encoder.conv_out.{lv}.bias"] = (d, D, 1, 1), (d,)
        out[f"decoder.decoder_embed.{lv}.weight"], out[f"decoder.decoder_embed.{lv}.bias"] = (Dd, d), (Dd,)
        out[f"decoder.latent_token_level_embedding.{lv}"] = (1, Dd)
    for s, W in (("encoder", D), ("decoder", Dd)):
        for n in ("ln_pre", "ln_post"):
            out[f"{s}.{n}.weight"], out[f"{s}.{n}.bias"] = (W,), (W,)
    blocks("encoder", D, cfg.encoder_depth, cfg.encoder_heads)
    blocks("decoder", Dd, cfg.decoder_depth, cfg.decoder_heads)
    out["quantize.embedding.weight"] = (cfg.codebook_size, d)
    out["decoder.latent_mask_token"], out["decoder.mask_token"] = (1, 1, d), (1, 1, Dd)
    out["decoder.ffn.weight"], out["decoder.ffn.bias"] = (Z, Dd, 1, 1), (Z,)
    if cfg.decoder_alignment:
        out["decoder.feat_mask_token"] = (1, 1, Dd)
        out["vf_proj_dec.weight"] = (A, Dd, 1, 1)
    if cfg.encoder_alignment:
        out["vf_proj.weight"] = (A, D, 1, 1)
    return out


def _cnn_keys(model: ResTok) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items() if k.startswith(("pixel_encoder.", "pixel_decoder."))}


@pytest.fixture(scope="module")
def tiny() -> ResTok:
    torch.manual_seed(0)
    m = ResTok.from_preset("restok-tiny")
    with torch.no_grad():  # make every tensor distinct so that a swapped mapping cannot pass
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return m


TINY_OVERRIDES = dict(image_size=64, legacy_latent_layout=False)


def test_inverse_mapping_produces_the_official_layout(tiny):
    official = to_official_state_dict(tiny.state_dict())
    want = official_layout(tiny.config, _cnn_keys(tiny))
    assert sorted(official) == sorted(want)
    bad = {k: (tuple(v.shape), want[k]) for k, v in official.items() if tuple(v.shape) != want[k]}
    assert bad == {}


def test_round_trip_and_config_inference(tiny):
    official = to_official_state_dict(tiny.state_dict())
    cfg = infer_restok_config(official, **TINY_OVERRIDES)
    assert architecture_diff(cfg, tiny.config) == {}
    sd = convert_restok_checkpoint(official, **TINY_OVERRIDES)
    own = tiny.state_dict()
    assert sorted(sd) == sorted(own)
    assert all(torch.equal(sd[k], own[k]) for k in own)
    m = load_official_restok(official, **TINY_OVERRIDES)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.encode(x)["indices"], tiny.eval().encode(x)["indices"])


def test_release_layout_on_meta():
    with torch.device("meta"):
        m = ResTok.from_preset("restok-l-128")
        official = to_official_state_dict(m.state_dict())
    want = official_layout(m.config, _cnn_keys(m))
    assert {k: tuple(v.shape) for k, v in official.items()} == want
    # stacked embeddings are unrolled: stages (4 -> 4 keys) and latent levels (8 rows, encoder and decoder)
    assert len(official) == len(m.state_dict()) + (m.config.hierarchy_stages - 1) + 2 * (len(m.config.latent_levels) - 1)
    cfg = infer_restok_config(official)
    assert architecture_diff(cfg, m.config) == {}
    with torch.device("meta"):
        sd = convert_restok_checkpoint(official)
    assert set(sd) == set(m.state_dict())


def test_checkpoint_without_alignment_heads_infers_them_off(tiny):
    official = {k: v for k, v in to_official_state_dict(tiny.state_dict()).items()
                if not k.startswith(("vf_proj", "decoder.feat_mask_token"))}
    cfg = infer_restok_config(official, **TINY_OVERRIDES)
    assert not cfg.encoder_alignment and not cfg.decoder_alignment
    m = load_official_restok(official, **TINY_OVERRIDES)
    assert m.encoder_align is None and m.decoder_align is None


def test_unmatched_keys_are_all_named(tiny):
    official = to_official_state_dict(tiny.state_dict())
    broken = dict(official)
    del broken["encoder.blocks.1.attn.v_bias"]
    del broken["decoder.ffn.bias"]
    broken["encoder.blocks.0.attn.mystery"] = torch.zeros(3)
    broken["decoder.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        convert_restok_checkpoint(broken, **TINY_OVERRIDES)
    msg = str(e.value)
    for k in ("encoder.blocks.1.attn.v_bias", "decoder.token_out.bias", "encoder.blocks.0.attn.mystery",
              "decoder.extra_head.weight"):
        assert k in msg, k
    wrong = dict(official)
    wrong["decoder.mask_token"] = torch.zeros(1, 1, 5)
    with pytest.raises(ValueError, match=r"decoder.image_query: checkpoint \(5,\)"):
        convert_restok_checkpoint(wrong, **TINY_OVERRIDES)
    cfg = dataclasses.replace(tiny.config, codebook_size=128)
    with pytest.raises(ValueError, match="quantizer.embedding.weight"):
        convert_restok_checkpoint(official, cfg)


def test_prefixes_foundation_model_and_key_bias(tiny):
    official = to_official_state_dict(tiny.state_dict())
    wrapped = {"_orig_mod." + k: v for k, v in official.items()}
    wrapped["_orig_mod.foundation_model.model.blocks.0.attn.qkv.weight"] = torch.zeros(4, 4)
    wrapped["_orig_mod.encoder.blocks.0.attn.k_bias"] = torch.zeros(64)
    sd = convert_restok_checkpoint(wrapped, **TINY_OVERRIDES)
    assert all(torch.equal(sd[k], v) for k, v in tiny.state_dict().items())
    wrapped["_orig_mod.encoder.blocks.0.attn.k_bias"] = torch.ones(64)
    with pytest.raises(ValueError, match="k_bias is not zero"):
        convert_restok_checkpoint(wrapped, **TINY_OVERRIDES)


def test_file_formats(tiny, tmp_path):
    official = to_official_state_dict(tiny.state_dict())
    save_file(official, str(tmp_path / "model.safetensors"))
    torch.save(official, tmp_path / "ema.bin")
    torch.save({"state_dict": official}, tmp_path / "ckpt.pt")
    (tmp_path / "hub").mkdir()
    torch.save(official, tmp_path / "hub" / "pytorch_model.bin")
    own = tiny.state_dict()
    for src in ("model.safetensors", "ema.bin", "ckpt.pt", "hub"):
        sd = convert_restok_checkpoint(tmp_path / src, **TINY_OVERRIDES)
        assert all(torch.equal(sd[k], own[k]) for k in own), src
    with pytest.raises(FileNotFoundError):
        convert_restok_checkpoint(tmp_path / "nope.bin")


class _Payload:
    def __reduce__(self):  # unpickling this would run code: weights_only refuses it
        return (print, ("payload ran",))


def test_pickles_are_read_weights_only(tiny, tmp_path):
    torch.save({"state_dict": {"a": torch.zeros(1)}, "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil.pt is not a readable checkpoint \(UnpicklingError"):
        convert_restok_checkpoint(tmp_path / "evil.pt")


def test_incomplete_checkpoint_names_every_absent_key(tiny):
    """Tensors the config is read from are checked up front: one ValueError, not a KeyError."""
    official = to_official_state_dict(tiny.state_dict())
    gone = ["pixel_encoder.down.1.block.0.conv1.weight", "encoder.blocks.0.mlp.fc1.weight",
            "encoder.latent_token_level_embedding.0"]
    assert all(k in official for k in gone)
    broken = {k: v for k, v in official.items() if k not in gone}
    for fn in (infer_restok_config, convert_restok_checkpoint, load_official_restok):
        with pytest.raises(ValueError, match="missing") as e:
            fn(broken, **TINY_OVERRIDES)
        assert all(k in str(e.value) for k in gone), fn.__name__


def test_checkpoint_files_are_read_alike_for_both_converters(tmp_path):
    from hieratok.convert import load_official_state_dict

    sd = {"a.weight": torch.ones(2, 3)}
    for i, wrapper in enumerate(("model", "state_dict", "module", "ema")):
        torch.save({wrapper: sd, "step": 7}, tmp_path / f"c{i}.pt")
        assert torch.equal(load_official_state_dict(tmp_path / f"c{i}.pt")["a.weight"], sd["a.weight"])
    d = tmp_path / "hub"
    d.mkdir()
    torch.save(sd, d / "pytorch_model.bin")
    assert set(load_official_state_dict(d)) == {"a.weight"}
    (tmp_path / "bad.pt").write_bytes(b"\x80not a pickle")
    with pytest.raises(ValueError, match="bad.pt is not a readable checkpoint"):
        load_official_state_dict(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_official_state_dict(tmp_path / "missing.pt")
    torch.save({"model": {"x": 1}}, tmp_path / "notensors.pt")
    with pytest.raises(ValueError, match="not a state dict of tensors"):
        load_official_state_dict(tmp_path / "notensors.pt")
