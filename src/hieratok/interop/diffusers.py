"""diffusers interop, both ways (``pip install hieratok[diffusers]``; diffusers is imported lazily).

- :func:`as_diffusers_vae`: a hieratok tokenizer with a continuous latent (HieraTok) behind the
  interface diffusers code uses of an ``AutoencoderKL`` (:class:`DiffusersVAE`).
- :class:`AutoencoderKLTokenizer`: a diffusers ``AutoencoderKL`` behind hieratok's
  :class:`~hieratok.tokenizers.base.Tokenizer` interface. ``load_model("diffusers:<dir>")`` returns
  one, so ``eval recon``, ``eval latents`` and ``cache-latents`` score an SD-VAE, SDXL-VAE or any
  ``AutoencoderKL`` under hieratok's protocol (posterior mode, ADM centre crop, uint8 metrics).

The mapping. HieraTok's encoder gives a diagonal Gaussian over z (B, d, G, G), G = image_size /
patch_size, its log-variance clamped to [-30, 20]: LDM's definition, which diffusers'
``DiagonalGaussianDistribution`` also implements. The adapter builds that class from the same mean
and log-variance, so ``mode()`` / ``mean`` / ``std`` / ``sample(generator)`` are those of
:meth:`HieraTok.encode`, value for value. ``decode`` returns the finest scale (the whole pyramid:
``tokenizer.decode(z, all_scales=True)``). The other way, an AutoencoderKL's ``latent_dist``
parameters become a :class:`~hieratok.distributions.DiagonalGaussian`; its latent is the raw one
(no ``scaling_factor``), as hieratok caches and normalises latents itself.

Scaling. ``cache-latents --update-tokenizer`` writes the per-channel mean m_c and std s_c of the
cached latents into the tokenizer's config (``latent_mean`` / ``latent_std``); the adapter turns
them into the fields diffusers reads (C channels, each statistic over equally many values):

- ``normalization="global"`` (default): ``shift_factor = M = mean_c m_c`` and ``scaling_factor =
  1 / sqrt(mean_c(s_c^2 + m_c^2) - M^2)``, the std over all elements, so ``(z - shift_factor) *
  scaling_factor`` has mean 0 and std 1 on the cache (the SD3 / Flux convention; SD-1 and DiT
  pipelines use ``scaling_factor`` alone);
- ``normalization="channel"``: ``latents_mean = m``, ``latents_std = s``, ``scaling_factor = 1``
  (SDXL's ``(z - latents_mean) * scaling_factor / latents_std``; hieratok's DiT normalises so).

Legend: B batch, d latent channels, G latent grid side.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from .._optional import require
from ..distributions import DiagonalGaussian
from ..hub import CONFIG_NAME, read_json
from ..tokenizers.base import Tokenizer
from ..tokenizers.inputs import check_images

__all__ = ["as_diffusers_vae", "DiffusersVAE", "AutoencoderKLTokenizer", "load_autoencoder_kl", "scaling_fields"]

log = logging.getLogger(__name__)
NORMALIZATIONS = ("global", "channel")


def _diffusers(module: str = "diffusers") -> Any:
    """diffusers (or one of its modules), with a one-line error naming the extra when missing."""
    return require(module, "diffusers interop")


def scaling_fields(mean: Optional[list[float]], std: Optional[list[float]], normalization: str = "global",
                   scaling_factor: Optional[float] = None, shift_factor: Optional[float] = None) -> dict[str, Any]:
    """diffusers' ``scaling_factor`` / ``shift_factor`` / ``latents_mean`` / ``latents_std`` from
    per-channel latent statistics (module docstring); ``scaling_factor`` / ``shift_factor`` given
    explicitly take precedence. Without statistics: the given factors, else 1 and no shift (warned)."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    out: dict[str, Any] = {"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None}
    if mean is None:
        if normalization == "channel":
            raise ValueError("normalization='channel' needs the tokenizer's latent statistics (latent_mean / latent_std "
                             "in its config.json: run `hieratok cache-latents --update-tokenizer`)")
        if scaling_factor is None:
            log.warning("the tokenizer has no latent statistics: scaling_factor 1, no shift (run "
                        "`hieratok cache-latents --update-tokenizer`, or pass scaling_factor)")
    elif normalization == "channel":
        out.update(latents_mean=list(mean), latents_std=list(std))
    else:
        m = sum(mean) / len(mean)
        var = sum(s * s + u * u for u, s in zip(mean, std)) / len(mean) - m * m
        out.update(scaling_factor=1.0 / math.sqrt(var), shift_factor=m)
    if scaling_factor is not None:
        out["scaling_factor"] = float(scaling_factor)
    if shift_factor is not None:
        out["shift_factor"] = float(shift_factor)
    return out


class DiffusersVAE(nn.Module):
    """A hieratok tokenizer with a continuous latent, with ``AutoencoderKL``'s interface: ``encode(x)
    .latent_dist``, ``decode(z).sample`` (``return_dict=False``: tuples), ``config`` (attribute and
    key access), ``dtype``, ``device``; made by :func:`as_diffusers_vae`."""

    def __init__(self, tokenizer: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.config = _diffusers().configuration_utils.FrozenDict(config)
        self.use_slicing = self.use_tiling = False  # attributes some pipelines read

    @property
    def dtype(self) -> torch.dtype:
        return self.tokenizer.last_layer().dtype

    @property
    def device(self) -> torch.device:
        return self.tokenizer.last_layer().device

    def encode(self, x_BCHW: torch.Tensor, return_dict: bool = True) -> Any:
        """Images in [-1, 1] -> ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`` over z (B, d, G, G)."""
        vae_mod, outputs = _diffusers("diffusers.models.autoencoders.vae"), _diffusers("diffusers.models.modeling_outputs")
        post = self.tokenizer.encode(x_BCHW)
        dist = vae_mod.DiagonalGaussianDistribution(torch.cat([post.mean, post.logvar], dim=1))  # the clamp is idempotent
        return outputs.AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(self, z_BdGG: torch.Tensor, return_dict: bool = True, generator: Optional[torch.Generator] = None) -> Any:
        """Latents -> ``DecoderOutput(sample=finest image)``; ``generator`` is accepted as AutoencoderKL's and unused."""
        x = self.tokenizer.detokenize(z_BdGG)
        return _diffusers("diffusers.models.autoencoders.vae").DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None) -> Any:
        dist = self.encode(sample).latent_dist
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode(), return_dict=return_dict)


def as_diffusers_vae(tokenizer: Any, *, normalization: str = "global", scaling_factor: Optional[float] = None,
                     shift_factor: Optional[float] = None) -> DiffusersVAE:
    """``tokenizer`` (a HieraTok) as a drop-in for diffusers' ``AutoencoderKL``.

    Args:
        tokenizer: a hieratok tokenizer with a continuous latent and a Gaussian posterior (``encode``).
        normalization: how its latent statistics become diffusers' scaling fields: ``"global"``
            (``scaling_factor`` and ``shift_factor``) or ``"channel"`` (``latents_mean`` /
            ``latents_std``); see the module docstring.
        scaling_factor, shift_factor: explicit values instead of those from the statistics.

    Example:
        >>> vae = as_diffusers_vae(HieraTok.from_pretrained("my-tok"))
        >>> z = vae.encode(x).latent_dist.sample(generator)       # (B, d, G, G)
        >>> z = (z - vae.config.shift_factor) * vae.config.scaling_factor
    """
    kind = getattr(tokenizer, "model_type", type(tokenizer).__name__)
    if isinstance(tokenizer, AutoencoderKLTokenizer):
        raise TypeError("this tokenizer wraps a diffusers AutoencoderKL already: use its .vae")
    if not (isinstance(tokenizer, Tokenizer) and isinstance(tokenizer, nn.Module)):
        raise TypeError(f"{kind} is not a hieratok tokenizer (hieratok.tokenizers.base.Tokenizer)")
    if tokenizer.codebook_size is not None:
        raise TypeError(f"{kind} is a VQ tokenizer ({tokenizer.codebook_size} codes): diffusers' AutoencoderKL "
                        "interface needs a continuous latent with a Gaussian posterior (HieraTok)")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"{kind} has no encode() -> Gaussian posterior for diffusers' latent_dist")
    c = tokenizer.config
    mean, std = getattr(c, "latent_mean", None), getattr(c, "latent_std", None)
    patch = c.patch_size
    fields = {
        "in_channels": c.in_channels, "out_channels": c.in_channels, "latent_channels": c.latent_channels,
        "sample_size": c.image_size,
        # pipelines derive the pixel-to-latent factor as 2 ** (len(block_out_channels) - 1)
        "block_out_channels": [c.latent_channels] * (int(math.log2(patch)) + 1) if patch & (patch - 1) == 0 else None,
        "force_upcast": False,
        **scaling_fields(mean, std, normalization, scaling_factor, shift_factor),
    }
    return DiffusersVAE(tokenizer, fields)


# ---- the other way: a diffusers AutoencoderKL as a hieratok Tokenizer ----------------------------


@dataclass
class AutoencoderKLTokenizerConfig:
    """What hieratok reads of a wrapped AutoencoderKL (its own config stays ``vae.config``)."""

    image_size: int  # the evaluation / caching crop: the VAE's sample_size unless given
    latent_channels: int
    downsample_factor: int  # 2 ** (len(block_out_channels) - 1)


class AutoencoderKLTokenizer(nn.Module):
    """A diffusers ``AutoencoderKL`` implementing :class:`~hieratok.tokenizers.base.Tokenizer`:
    ``tokenize`` is the posterior mode (raw, unscaled), one output scale, no codebook."""

    model_type: ClassVar[str] = "autoencoderkl"
    codebook_size = None

    def __init__(self, vae: nn.Module, image_size: Optional[int] = None) -> None:
        super().__init__()
        c = vae.config
        factor = 2 ** (len(c.block_out_channels) - 1)
        size = image_size or c.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        if not isinstance(size, int) or size < 1 or size % factor:
            raise ValueError(f"image size {size!r} is not a positive multiple of the VAE's downsampling factor {factor}")
        self.vae = vae
        self.config = AutoencoderKLTokenizerConfig(size, c.latent_channels, factor)

    def check_image_size(self, height: int, width: int) -> None:
        f = self.config.downsample_factor
        if height < 1 or width < 1 or height % f or width % f:
            raise ValueError(f"image size {height}x{width} does not work: this AutoencoderKL needs sides that are "
                             f"positive multiples of its downsampling factor {f}")

    def encode(self, x_BCHW: torch.Tensor) -> DiagonalGaussian:
        """Any size whose sides are multiples of the downsampling factor (a convolutional VAE)."""
        check_images(x_BCHW, self.vae.config.in_channels, None, self.training, self.config.downsample_factor,
                     "the VAE's downsampling factor")
        return DiagonalGaussian(self.vae.encode(x_BCHW).latent_dist.parameters)

    def decode(self, z_BdGG: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z_BdGG.to(self.last_layer().dtype)).sample

    def output_sides(self) -> list[int]:
        return [self.config.image_size]

    def tokenize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.encode(x_BCHW).mode()

    def detokenize(self, z_BdGG: torch.Tensor, all_scales: bool = False) -> torch.Tensor:
        if all_scales:
            raise ValueError("an AutoencoderKL has one output scale: all_scales=True needs a multi-scale tokenizer")
        return self.decode(z_BdGG)

    def reconstruct(self, x_BCHW: torch.Tensor) -> tuple[list[torch.Tensor], None]:
        return [self.decode(self.tokenize(x_BCHW))], None

    def last_layer(self) -> torch.Tensor:
        return self.vae.decoder.conv_out.weight

    def no_weight_decay(self) -> set[str]:
        return set()


def load_autoencoder_kl(path: str | Path, image_size: Optional[int] = None) -> tuple[AutoencoderKLTokenizer, Path]:
    """(the AutoencoderKL saved in ``path`` by ``save_pretrained`` as a hieratok tokenizer, its folder).

    ``path`` may also be a pipeline folder with the VAE in ``vae/``; nothing is downloaded.
    """
    d = Path(path).expanduser()
    if not (d / CONFIG_NAME).is_file() and (d / "vae" / CONFIG_NAME).is_file():
        d = d / "vae"
    if not (d / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{d}: no {CONFIG_NAME}; diffusers:<dir> takes a folder written by AutoencoderKL.save_pretrained")
    cls = read_json(d / CONFIG_NAME).get("_class_name")
    if cls != "AutoencoderKL":
        raise ValueError(f"{d}: the config is of a diffusers {cls!r}, not an AutoencoderKL")
    vae = _diffusers().AutoencoderKL.from_pretrained(str(d), local_files_only=True)
    return AutoencoderKLTokenizer(vae, image_size), d
