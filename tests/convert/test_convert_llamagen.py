"""Official LlamaGen / ResTok-HAR checkpoint names <-> ours."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hieratok.convert.llamagen import (
    convert_llamagen_state_dict,
    gpt_config_from_official,
    infer_gpt_config,
    llamagen_key_map,
    load_llamagen_gpt,
    to_official_gpt_state_dict,
)
from hieratok.generators.llamagen import GPT

# The authors' parameter names (autoregressive/models/gpt_har.py), written out independently.
OFFICIAL_GLOBAL = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight",
                   "spe_tok_embeddings.special_embeddings.weight", "norm.weight", "output.weight"}
OFFICIAL_LAYER = {"attention.wqkv.weight", "attention.wo.weight", "feed_forward.w1.weight", "feed_forward.w2.weight",
                  "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight"}


def _official(m):
    sd = to_official_gpt_state_dict(m.state_dict(), m.config)
    # what real checkpoints carry besides the weights: a compile prefix and a RoPE table
    sd = {"_orig_mod." + k: v.clone() for k, v in sd.items()}
    sd["freqs_cis"] = torch.zeros(129, 8, 2)
    return sd


def test_official_names_are_the_authors():
    cfg = GPT.preset_config("gpt-tiny")
    expected = OFFICIAL_GLOBAL | {f"layers.{i}.{k}" for i in range(cfg.depth) for k in OFFICIAL_LAYER}
    assert set(llamagen_key_map(cfg)) == expected
    assert set(llamagen_key_map(cfg).values()) == set(GPT(cfg).state_dict())


def test_roundtrip_through_the_official_layout(tiny_gpt):
    m = tiny_gpt
    sd = _official(m)
    assert sd["_orig_mod.layers.1.feed_forward.w3.weight"] is not None
    m2 = GPT(m.config).eval()
    m2.load_state_dict(convert_llamagen_state_dict(sd, m.config))
    tokens, labels = torch.randint(0, 64 + 127, (2, 11)), torch.tensor([1, 10])
    assert torch.equal(m2(tokens, labels), m(tokens, labels))
    # the fused qkv keeps the official q | k | v row order: the q rows are the first D rows
    D = m.config.dim
    torch.testing.assert_close(sd["_orig_mod.layers.0.attention.wqkv.weight"][:D], m.blocks[0].attn.qkv.weight[:D])


def test_unmatched_and_missing_keys_are_all_named(tiny_gpt):
    m = tiny_gpt
    sd = _official(m)
    del sd["_orig_mod.layers.1.attention.wo.weight"]
    del sd["_orig_mod.output.weight"]
    sd["adaLN_modulation.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as e:
        convert_llamagen_state_dict(sd, m.config)
    msg = str(e.value)
    for name in ("blocks.1.attn.proj.weight", "layers.1.attention.wo.weight", "head.weight", "output.weight",
                 "adaLN_modulation.weight"):
        assert name in msg
    sd = _official(m)
    sd["_orig_mod.tok_embeddings.weight"] = torch.zeros(65, m.config.dim)
    with pytest.raises(ValueError, match=r"tok_embed.weight: checkpoint \(65, 64\) vs model \(64, 64\)"):
        convert_llamagen_state_dict(sd, m.config)


def test_config_from_shapes_and_from_the_authors_config(tmp_path, tiny_gpt):
    m = tiny_gpt
    sd = _official(m)
    cfg = infer_gpt_config(sd, head_dim=16)
    for f in ("vocab_size", "dim", "depth", "num_heads", "num_classes", "num_placeholders"):
        assert getattr(cfg, f) == getattr(m.config, f)
    assert cfg.ffn_dim_multiplier is None
    # the released GPT-L config.json fields (ModelArgs) give our gpt-l preset
    official = dict(dim=1024, n_layer=24, n_head=16, vocab_size=8192, num_classes=1000, spe_token_num=127,
                    multiple_of=256, norm_eps=1e-5, rope_base=10000, model_type="c2i", n_kv_head=None)
    assert gpt_config_from_official(official) == GPT.preset_config("gpt-l")
    # a Hub-style directory with the authors' config.json and safetensors weights
    plain = {k[len("_orig_mod."):]: v for k, v in sd.items() if k.startswith("_orig_mod.")}
    save_file(plain, str(tmp_path / "model.safetensors"))
    off_cfg = dict(official, dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, multiple_of=32)
    (tmp_path / "config.json").write_text(json.dumps(off_cfg))
    loaded = load_llamagen_gpt(tmp_path, attn_backend="reference")
    tokens, labels = torch.randint(0, 64, (1, 7)), torch.tensor([2])
    torch.testing.assert_close(loaded(tokens, labels), m(tokens, labels), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="c2i"):
        gpt_config_from_official(dict(official, model_type="t2i"))


def test_authors_config_fields_for_the_sequence_are_checked():
    """cls_token_num, block_size and ar_token_num are not dropped: 128 codes with 4 next-token codes
    need 63 placeholders (har_layout), and the RoPE table covers block_size positions."""
    official = dict(dim=1024, n_layer=24, n_head=16, vocab_size=8192, num_classes=1000, spe_token_num=127,
                    multiple_of=256, cls_token_num=1, block_size=128, ar_token_num=4)
    assert gpt_config_from_official(official).max_seq_len == 128
    assert gpt_config_from_official(dict(official, spe_token_num=63)).num_placeholders == 63
    for bad, match in [(dict(cls_token_num=120), "cls_token_num"), (dict(spe_token_num=62), "needs 63 placeholders"),
                       (dict(block_size=100), "power of 2"), (dict(ar_token_num=0), "num_ar_tokens")]:
        with pytest.raises(ValueError, match=match):
            gpt_config_from_official(dict(official, **bad))
