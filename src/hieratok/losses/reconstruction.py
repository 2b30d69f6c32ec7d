"""Multi-scale reconstruction objective of HieraTok (section 3.2, eqs. 8-9; appendix E weights).

Every scale's reconstruction is compared with the input downsampled by area interpolation to
that scale's size: ``sum_k w_k (l1 * L1 + mse * MSE + perceptual * P)`` plus ``kl * KL``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributions import DiagonalGaussian

__all__ = ["ReconLossConfig", "MultiScaleReconstructionLoss", "scale_targets", "resolve_scale_weights", "SCALE_WEIGHTINGS"]

SCALE_WEIGHTINGS = ("equal", "pixels")


@dataclass
class ReconLossConfig:
    """Loss weights (paper appendix E: L1 1.0, MSE 0.4, LPIPS 1.0, KL 1e-6)."""

    l1: float = 1.0
    mse: float = 0.4
    perceptual: float = 1.0
    perceptual_kind: str = "auto"  # "auto" | "lpips-vgg" | "effnet-lite0" | "none"
    kl: float = 1e-6
    scale_weights: Any = "pixels"  # "equal" | "pixels" | a weight per scale, coarse to fine; default: README ablation

    def __post_init__(self) -> None:
        if self.perceptual_kind == "none" and self.perceptual > 0:
            raise ValueError(f"loss.perceptual_kind='none' needs loss.perceptual=0 (got {self.perceptual})")
        w = self.scale_weights
        if w is None:  # configs written before the named weightings
            self.scale_weights = "equal"
        elif isinstance(w, str):
            if w not in SCALE_WEIGHTINGS:
                raise ValueError(f"loss.scale_weights {w!r} is not one of {SCALE_WEIGHTINGS} or a list of weights")
        else:
            try:
                ws = tuple(float(v) for v in w)
            except (TypeError, ValueError):
                raise ValueError(f"loss.scale_weights must be {SCALE_WEIGHTINGS} or a list of numbers, got {w!r}") from None
            if not ws or not all(v >= 0 and v < float("inf") for v in ws) or not any(ws):
                raise ValueError(f"loss.scale_weights {list(ws)} must be finite, non-negative and not all zero")
            self.scale_weights = ws


def resolve_scale_weights(spec: Any, sides: Sequence[int]) -> tuple[float, ...]:
    """One weight per scale (coarse to fine) for the decoder scales of token-grid ``sides``.

    ``"equal"``: 1 each, the paper's sum over scales (eq. 9), so the finest scale carries 1/S of the
    pixel objective. ``"pixels"``: proportional to each scale's pixel (token) count and summing to
    S like ``"equal"``, so every pixel of every scale counts the same (the finest scale of
    [1, 2, 4, 8, 16] gets 256/341 of the objective). A list: those weights, one per scale.
    """
    S = len(sides)
    if spec is None or spec == "equal":
        return (1.0,) * S
    if spec == "pixels":
        n = [s * s for s in sides]
        return tuple(S * v / sum(n) for v in n)
    w = tuple(float(v) for v in spec)
    if len(w) != S:
        raise ValueError(f"loss.scale_weights has {len(w)} values for the {S} scales {list(sides)}")
    return w


def scale_targets(x_BCHW: torch.Tensor, sizes: Sequence[int | tuple[int, int]]) -> list[torch.Tensor]:
    """The input downsampled by area interpolation to each size, an int (square) or (h, w); the
    full size is ``x`` itself."""
    hw = [(s, s) if isinstance(s, int) else tuple(s) for s in sizes]
    return [x_BCHW if s == tuple(x_BCHW.shape[-2:]) else F.interpolate(x_BCHW, size=s, mode="area") for s in hw]


class MultiScaleReconstructionLoss(nn.Module):
    """Sum over scales of weighted L1 + MSE + perceptual, plus the KL term.

    Args:
        cfg: weights.
        scales: the decoder's token-grid sides, coarse to fine, or just their number (then
            ``"pixels"`` weights come from the reconstructions' sizes at each call).
        perceptual: a frozen module ``(x, y) -> (B,)`` distances, or None when its weight is 0.
    """

    def __init__(self, cfg: ReconLossConfig, scales: int | Sequence[int], perceptual: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_scales = scales if isinstance(scales, int) else len(scales)
        by_size = isinstance(scales, int) and cfg.scale_weights == "pixels"
        # None: "pixels" resolved from the reconstructions' pixel counts in forward
        self.scale_weights = None if by_size else resolve_scale_weights(
            cfg.scale_weights, [1] * scales if isinstance(scales, int) else list(scales))
        if cfg.perceptual > 0 and perceptual is None:
            raise ValueError("perceptual weight > 0 needs a perceptual module")
        self.perceptual = perceptual

    def forward(self, x_BCHW: torch.Tensor, recs: Sequence[torch.Tensor], posterior: Optional[DiagonalGaussian]) -> dict[str, torch.Tensor]:
        """``loss`` (to minimise), ``rec_loss`` (the same without KL), and detached logs: ``l1``,
        ``mse``, ``perceptual`` (weighted sums over scales), ``l1_s{size}``, ``mse_s{size}``, ``perceptual_s{size}``
        and ``kl``. ``recs``: one reconstruction per scale, coarse to fine, each at most the input's size."""
        c = self.cfg
        if len(recs) != self.num_scales:
            raise ValueError(f"{len(recs)} reconstructions for a loss built for {self.num_scales} scales")
        H, W = x_BCHW.shape[-2:]
        for r in recs:
            if r.shape[:2] != x_BCHW.shape[:2] or r.shape[-2] > H or r.shape[-1] > W:
                raise ValueError(f"reconstruction of shape {tuple(r.shape)} does not fit the input {tuple(x_BCHW.shape)}")
        targets = scale_targets(x_BCHW, [tuple(r.shape[-2:]) for r in recs])
        logs: dict[str, torch.Tensor] = {}
        total = x_BCHW.new_zeros(())
        l1_sum, mse_sum, p_sum = x_BCHW.new_zeros(()), x_BCHW.new_zeros(()), x_BCHW.new_zeros(())
        n = [r.shape[-2] * r.shape[-1] for r in recs]
        weights = self.scale_weights or tuple(len(n) * v / sum(n) for v in n)
        recs = [r.float() for r in recs]
        if c.perceptual > 0:  # all scales at once: one pass per upsampled shape where the module batches pairs
            ps = (self.perceptual.distances(recs, targets) if hasattr(self.perceptual, "distances")
                  else [self.perceptual(r, t) for r, t in zip(recs, targets)])
        for k, (rec, tgt, w) in enumerate(zip(recs, targets, weights)):
            l1, mse = F.l1_loss(rec, tgt), F.mse_loss(rec, tgt)
            term = c.l1 * l1 + c.mse * mse
            if c.perceptual > 0:
                p = ps[k].mean()
                term = term + c.perceptual * p
                p_sum = p_sum + w * p.detach()
                logs[f"perceptual_s{rec.shape[-1]}"] = p.detach()
            total = total + w * term
            l1_sum, mse_sum = l1_sum + w * l1.detach(), mse_sum + w * mse.detach()
            logs[f"l1_s{rec.shape[-1]}"], logs[f"mse_s{rec.shape[-1]}"] = l1.detach(), mse.detach()
        logs.update(l1=l1_sum, mse=mse_sum, perceptual=p_sum)
        logs["rec_loss"] = total  # VQGAN's / VA-VAE's "nll": what adaptive GAN / VF weights balance against
        if posterior is not None:
            kl = posterior.kl().mean()
            logs["kl"] = kl.detach()
            total = total + c.kl * kl
        logs["loss"] = total
        return logs
