"""Named configurations of every model family, as data (config field values by preset name).

Each model class reads its table: ``X.from_preset(name, **overrides)``, ``X.preset_config(name,
**overrides)`` and ``X.preset_names()`` (:class:`hieratok.hub.PretrainedMixin`); ``hieratok info``
lists them all.

HieraTok (appendix C/E): encoder 6 layers / 768 / 12 heads, decoder 24 / 1024 / 16, patch 16,
256x256 images, latent d = 16 or 32, scales [1, 2, 4, 8, 16] or the single scale [16]. ``tiny`` and
``small`` are for CPUs (tests, the demo). Their ``downsample_width`` is chosen so that the
downsampler's share of the parameters is the paper preset's (52.9M of 399.4M, 13.2%; the
multi-scale model 1.153x its twin): at the decoder width it would be 39% (tiny) and 25% (small), a
downsampler larger than the paper's relative to everything else. Overrides such as
``image_size=64``, ``scales=[1, 4, 16]``, ``downsample="interp"`` or ``attention="full"`` give the
ablations of Tables 3 and 4.
"""

from __future__ import annotations

from typing import Any

__all__ = ["HIERATOK_PRESETS", "RESTOK_PRESETS", "DIT_PRESETS", "GPT_PRESETS"]

_PAPER: dict[str, Any] = dict(image_size=256, patch_size=16, encoder_depth=6, encoder_width=768, encoder_heads=12,
                              decoder_depth=24, decoder_width=1024, decoder_heads=16)
_TINY: dict[str, Any] = dict(image_size=64, patch_size=8, latent_channels=8, encoder_depth=2, encoder_width=128,
                             encoder_heads=4, decoder_depth=4, decoder_width=192, decoder_heads=4, downsample_width=88)
_SMALL: dict[str, Any] = dict(image_size=128, patch_size=16, latent_channels=16, encoder_depth=4, encoder_width=256,
                              encoder_heads=4, decoder_depth=8, decoder_width=384, decoder_heads=6, downsample_width=256)

HIERATOK_PRESETS: dict[str, dict[str, Any]] = {
    "hieratok-f16d16": {**_PAPER, "latent_channels": 16},
    "hieratok-f16d16-single": {**_PAPER, "latent_channels": 16, "multiscale": False},
    "hieratok-f16d32": {**_PAPER, "latent_channels": 32},
    "hieratok-f16d32-single": {**_PAPER, "latent_channels": 32, "multiscale": False},
    "tiny": _TINY,
    "tiny-single": {**_TINY, "multiscale": False},
    "small": _SMALL,
    "small-single": {**_SMALL, "multiscale": False},
}

# ResTok: the release restok_l_128, and a CPU model
_RESTOK_TINY: dict[str, Any] = dict(
    image_size=64, cnn_channels=32, cnn_channel_mult=(1, 1, 2, 2), cnn_res_blocks=1, cnn_z_channels=32,
    encoder_width=64, encoder_depth=4, encoder_heads=2, decoder_width=64, decoder_depth=4, decoder_heads=2,
    num_latent_tokens=32, min_latent_tokens=4, codebook_size=256, codebook_dim=8, legacy_latent_layout=False,
    alignment_dim=32,
)

RESTOK_PRESETS: dict[str, dict[str, Any]] = {
    "restok-l-128": {},  # the release restok_l_128 (662M with its two alignment heads)
    # CPU tests: 64 px, 8x8 tokens, 32 latents in levels [1, 1, 2, 4, 8, 16]. With the release's
    # objective its codes collapse to one per level in short CPU runs (BENCHMARKS.md, "restok-tiny").
    "restok-tiny": _RESTOK_TINY,
}

# LlamaGen GPT: "gpt-b" / "gpt-l" are LlamaGen's GPT-B / GPT-L with ResTok's codebook (8192)
# and HAR placeholders (127); "gpt-l" is the released `llamagen_l_c2i_restok_l_128` (326M).
_RESTOK_HEAD: dict[str, Any] = dict(vocab_size=8192, num_classes=1000, num_placeholders=127)
GPT_PRESETS: dict[str, dict[str, Any]] = {
    "gpt-b": {**_RESTOK_HEAD, "dim": 768, "depth": 12, "num_heads": 12},
    "gpt-l": {**_RESTOK_HEAD, "dim": 1024, "depth": 24, "num_heads": 16},
    "gpt-tiny": dict(vocab_size=64, num_classes=10, num_placeholders=127, dim=64, depth=2, num_heads=4,
                     ffn_multiple_of=32),
}

# DiT: the DiT paper's sizes and a CPU model. Latent geometry comes from the
# DiTConfig defaults (the HieraTok f16d16 latent) or from overrides.
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "dit-b": dict(depth=12, width=768, num_heads=12),
    "dit-l": dict(depth=24, width=1024, num_heads=16),
    "dit-xl": dict(depth=28, width=1152, num_heads=16),
    "dit-tiny": dict(depth=4, width=128, num_heads=4),
}
