"""The ResTok tokenizer: pixel CNNs, the ViT encoder and decoder, the quantizer and the public API.

Legend: B batch, N latent tokens, d code dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
from typing import Any, ClassVar, Optional, Union

import torch
from torch import nn

from ...hub import PretrainedMixin
from ...nn.attention import check_backend
from ...nn.conv_autoencoder import ConvDecoder, ConvEncoder, ConvResBlock
from ...nn.transformer import set_attention_backend, set_fast_paths
from ...presets import RESTOK_PRESETS
from ...quantizers.vq import VectorQuantizer
from ..inputs import check_images
from .config import ResTokConfig
from .hierarchy import nested_dropout_choices
from .transformer import ResTokDecoder, ResTokEncoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KeepLike = Union[None, int, torch.Tensor]
ImageSize = Union[None, int, tuple[int, int]]

class ResTok(PretrainedMixin, nn.Module):
    """ResTok 1D VQ tokenizer.

    Example:
        >>> m = ResTok.from_preset("restok-tiny").eval()
        >>> enc = m.encode(x)                        # x in [-1, 1], (B, 3, 64, 64)
        >>> rec = m.decode_indices(enc["indices"])   # (B, 3, 64, 64)
        >>> coarse = m.decode_indices(enc["indices"][:, :8])   # first 8 tokens only
    """

    config_class: ClassVar[type] = ResTokConfig
    model_type: ClassVar[str] = "restok"
    presets = RESTOK_PRESETS

    def __init__(self, config: ResTokConfig) -> None:
        super().__init__()
        self.config = c = config
        cnn = dict(channels=c.cnn_channels, channel_mult=c.cnn_channel_mult, num_res_blocks=c.cnn_res_blocks,
                   z_channels=c.cnn_z_channels, groups=c.cnn_groups)
        self.pixel_encoder = ConvEncoder(3, **cnn)
        self.encoder = ResTokEncoder(c)
        self.quantizer = VectorQuantizer(c.codebook_size, c.codebook_dim, c.l2_normalized_codes, c.commitment_beta)
        self.decoder = ResTokDecoder(c)
        self.pixel_decoder = ConvDecoder(3, **cnn)
        self.encoder_align = nn.Linear(c.encoder_width, c.alignment_dim, bias=False) if c.encoder_alignment else None
        self.decoder_align = nn.Linear(c.decoder_width, c.alignment_dim, bias=False) if c.decoder_alignment else None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialisation of the release: trunc-normal(0.02) linears/convs, N(0, 1/D) embeddings."""
        std = self.config.init_std

        def init(m: nn.Module) -> None:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)
        for stack in (self.encoder, self.decoder):
            D = stack.norm_pre.normalized_shape[0]
            for p in (getattr(stack, n, None) for n in ("stage_embed", "latent_level_embed", "image_query", "align_query")):
                if p is not None:
                    nn.init.normal_(p, std=D ** -0.5)
            for blk in stack.blocks:
                nn.init.ones_(blk.layer_scale1)
                nn.init.ones_(blk.layer_scale2)
                nn.init.zeros_(blk.attn.q_bias)
                nn.init.zeros_(blk.attn.v_bias)
        nn.init.normal_(self.decoder.latent_mask_token, std=self.config.decoder_width ** -0.5)
        self.quantizer.reset_parameters()

    # ---- construction -------------------------------------------------------------------------

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` ("sdpa", "reference" or "flex")."""
        self.config = dataclasses.replace(self.config, attn_backend=check_backend(backend))
        set_attention_backend(self, backend)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute transformer layers in the backward pass (less memory, same gradients)."""
        self.encoder.grad_checkpointing = enabled
        self.decoder.grad_checkpointing = enabled

    def set_fast_paths(self, enabled: bool = True) -> None:
        """Switch every inference fast path on (default) or to its reference path (see the module docstring)."""
        set_fast_paths(self, enabled)
        self.encoder.last_layer_needed_rows = self.decoder.last_layer_needed_rows = enabled
        for cnn in (self.pixel_encoder, self.pixel_decoder):
            cnn.channels_last = enabled
            for m in cnn.modules():
                if isinstance(m, ConvResBlock):
                    m.inplace_act = enabled
        self.pixel_decoder.fused_upsample = enabled

    # ---- nested dropout -----------------------------------------------------------------------
    def nested_dropout(self, batch_size: int, generator: Optional[torch.Generator] = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
        """Kept prefix length per sample, (B,) int64 (see :func:`nested_dropout_choices`)."""
        c = self.config
        lengths, probs = nested_dropout_choices(c.num_latent_tokens, c.min_latent_tokens, c.nested_dropout_prob)
        gdev = generator.device if generator is not None else "cpu"
        pick = torch.multinomial(torch.tensor(probs, device=gdev), batch_size, replacement=True, generator=generator)
        return torch.tensor(lengths, device=gdev)[pick].to(device if device is not None else self.pixel_mean.device)

    def _keep(self, keep: KeepLike, B: int, device: torch.device) -> Optional[torch.Tensor]:
        N = self.config.num_latent_tokens
        if keep is None:
            return None
        if isinstance(keep, numbers.Integral) and not isinstance(keep, bool):  # int, np.int64, ...
            k = torch.full((B,), int(keep), dtype=torch.long, device=device)
        elif isinstance(keep, torch.Tensor) and not (keep.is_floating_point() or keep.is_complex()
                                                     or keep.dtype == torch.bool):
            k = keep.to(device).long()
        else:
            raise ValueError(f"keep must be an integer or an integer (B={B},) tensor of prefix lengths, "
                             f"got {type(keep).__name__} {getattr(keep, 'dtype', '')}".rstrip())
        if k.shape != (B,):
            raise ValueError(f"keep must be an int or a (B={B},) tensor of prefix lengths, got shape {tuple(k.shape)}")
        if bool(((k < 1) | (k > N)).any()):
            raise ValueError(f"kept prefix lengths must lie in [1, {N}], got {k.tolist()}")
        return k

    # ---- API ----------------------------------------------------------------------------------
    def _check_images(self, x: torch.Tensor) -> None:
        check_images(x, 3, None, self.training)
        self.config.grid_shape(*x.shape[-2:])  # a ValueError naming the multiples for a size that cannot work

    def check_image_size(self, height: int, width: int) -> None:
        """A ValueError for an image size this model cannot encode (see :meth:`ResTokConfig.grid_shape`)."""
        self.config.grid_shape(height, width)

    def encode(self, x_BCHW: torch.Tensor, image_tokens: bool = True) -> dict[str, Any]:
        """Images in [-1, 1] -> codes (``image_tokens=False``: no image stages and no alignment
        output, and the encoder's last layer runs its latent rows alone; see :meth:`encode_indices`).

        Returns:
            dict with ``indices`` (B, N) int64, ``quantized`` (B, N, d) (straight-through),
            ``latents`` (B, N, d) before quantisation, ``vq_loss`` (codebook + beta * commitment),
            ``commitment_loss``, ``codebook_loss``, ``image_tokens`` (the encoder's image stages,
            coarse first, each (B, n_s, D)) and, with an encoder alignment head,
            ``encoder_alignment`` (B, n_0, A): the projected coarsest image tokens.
        """
        self._check_images(x_BCHW)
        x01 = (x_BCHW + 1.0) / 2.0
        feat = self.pixel_encoder((x01 - self.pixel_mean) / self.pixel_std)  # (B, Z, G, G)
        z_BNd, stages = self.encoder(feat, image_tokens)
        vq = self.quantizer(z_BNd)
        out = {"indices": vq.indices, "quantized": vq.quantized, "latents": z_BNd, "vq_loss": vq.loss,
               "commitment_loss": vq.commitment_loss, "codebook_loss": vq.codebook_loss, "image_tokens": stages}
        if self.encoder_align is not None and stages:
            out["encoder_alignment"] = self.encoder_align(stages[0])
        return out

    def encode_indices(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> code indices (B, N): only what the codes need (inference, code extraction)."""
        return self.encode(x_BCHW, image_tokens=False)["indices"]

    def decode(self, quantized_BNd: torch.Tensor, keep: KeepLike = None, with_alignment: bool = False,
               image_size: ImageSize = None) -> Any:
        """Code vectors (B, N, d) -> images in [-1, 1]; ``keep`` masks all but a prefix (int or (B,)).

        ``image_size``: (H, W) (or one side) of the images to decode, default the training size (the
        codes are 1D: the size is the caller's choice, usually the encoded image's).
        With ``with_alignment`` returns ``(images, alignment features (B, A, Gh, Gw))``.
        """
        c = self.config
        if quantized_BNd.ndim != 3 or tuple(quantized_BNd.shape[1:]) != (c.num_latent_tokens, c.codebook_dim):
            raise ValueError(f"expected codes of shape (B, {c.num_latent_tokens}, {c.codebook_dim}), "
                             f"got {tuple(quantized_BNd.shape)}")
        keep_B = self._keep(keep, quantized_BNd.shape[0], quantized_BNd.device)
        size = image_size or c.image_size
        grid = c.grid_shape(*((size, size) if isinstance(size, int) else size))
        feat, align = self.decoder(quantized_BNd, keep_B, with_alignment, grid)
        dev = feat.device.type
        ctx = torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext()
        with ctx:  # the pixel decoder runs in float32, as released
            img01 = self.pixel_decoder(feat.float())
        img = img01 * 2.0 - 1.0
        if with_alignment:
            assert self.decoder_align is not None and align is not None
            return img, self.decoder_align(align.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return img

    def decode_indices(self, indices_Bn: torch.Tensor, image_size: ImageSize = None) -> torch.Tensor:
        """Code indices (B, n), n <= N a prefix of the sequence -> images in [-1, 1] of ``image_size``
        (see :meth:`decode`); missing tokens are masked."""
        N = self.config.num_latent_tokens
        if indices_Bn.ndim != 2 or not 1 <= indices_Bn.shape[1] <= N:
            raise ValueError(f"expected indices of shape (B, n) with 1 <= n <= {N}, got {tuple(indices_Bn.shape)}")
        B, n = indices_Bn.shape
        q = self.quantizer.decode(indices_Bn)
        if n < N:
            q = torch.cat((q, q.new_zeros(B, N - n, q.shape[-1])), dim=1)
        return self.decode(q, keep=n if n < N else None, image_size=image_size)

    # ---- the Tokenizer interface (tokenizers/base.py) ----
    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def output_sides(self) -> list[int]:
        return [self.config.image_size]

    def tokenize(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        """Code indices (B, N): what the HAR / AR generator models."""
        return self.encode_indices(x_BCHW)

    def detokenize(self, indices_Bn: torch.Tensor, all_scales: bool = False) -> torch.Tensor:
        if all_scales:
            raise ValueError("all_scales: ResTok decodes one image per code sequence (no pyramid)")
        return self.decode_indices(indices_Bn.long())

    def reconstruct(self, x_BCHW: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        idx = self.tokenize(x_BCHW)
        return [self.decode_indices(idx, tuple(x_BCHW.shape[-2:]))], idx

    def last_layer(self) -> torch.Tensor:
        return self.pixel_decoder.conv_out.weight

    def no_weight_decay(self) -> set[str]:
        return set()

    def forward(
        self,
        x_BCHW: torch.Tensor,
        keep: KeepLike = None,
        generator: Optional[torch.Generator] = None,
        return_alignment: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Encode, quantise, (nested-dropout,) decode.

        Args:
            x_BCHW: images in [-1, 1].
            keep: kept prefix length(s); ``None`` draws them by nested dropout in training mode
                (with ``generator`` when given) and keeps everything in eval mode.
            generator: random source for nested dropout.
            return_alignment: also return the alignment outputs (default: in training mode when
                the model has alignment heads).

        Returns:
            :meth:`encode`'s dict plus ``reconstructions`` (B, 3, H, W) in [-1, 1], ``keep``
            (B,) kept prefix lengths (None when nothing was masked) and, with alignment,
            ``decoder_alignment`` (B, A, G, G).
        """
        out = self.encode(x_BCHW)
        B, size = x_BCHW.shape[0], tuple(x_BCHW.shape[-2:])
        if keep is None and self.training and self.config.nested_dropout_prob > 0:
            keep_B: Optional[torch.Tensor] = self.nested_dropout(B, generator, x_BCHW.device)  # valid by construction
        else:
            keep_B = self._keep(keep, B, x_BCHW.device)
        if return_alignment and self.decoder_align is None:
            raise ValueError("return_alignment=True, but this ResTok has no decoder alignment head (decoder_alignment=False)")
        want = self.training if return_alignment is None else return_alignment
        if want and self.decoder_align is not None:
            out["reconstructions"], out["decoder_alignment"] = self.decode(out["quantized"], keep_B, with_alignment=True,
                                                                           image_size=size)
        else:
            out["reconstructions"] = self.decode(out["quantized"], keep_B, image_size=size)
        if not want:
            out.pop("encoder_alignment", None)
        out["keep"] = keep_B
        return out
