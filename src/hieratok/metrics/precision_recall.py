"""Improved precision and recall (Kynkäänniemi et al. 2019), as the ADM evaluator reports them.

Each feature set defines a manifold: the union of balls around its points, the radius of a point
being the distance to its k-th nearest neighbour in the same set (k = 3; the point itself not
counted). Then

* precision = fraction of *generated* points inside the manifold of the *real* (reference) points,
* recall    = fraction of *real* points inside the manifold of the *generated* points,

"inside" meaning within at least one ball (distance <= radius). ADM computes both on the 2048-d
Inception pool3 features of its 10k-image reference batch and the 50k samples.

Everything is computed in blocks of ``block_size`` x ``block_size`` squared distances, so memory
stays ``O(block^2 + N k)``; squared distances (``|u|^2 - 2 u.v + |v|^2``, clamped at 0) are
compared with squared radii, which is the same test. They run in exact float32 on the features'
device (ADM uses float16 distances where finite, a difference at the 1e-3 relative level near the
ball boundaries).

Shape legend: N reference points, M generated points, D feature dim, K neighbourhood size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..precision import exact_fp32

__all__ = ["PrecisionRecall", "manifold_radii", "in_manifold", "precision_recall"]


def _sq_dists(a_ND: torch.Tensor, b_MD: torch.Tensor) -> torch.Tensor:
    d = (a_ND * a_ND).sum(1, keepdim=True) - 2.0 * (a_ND @ b_MD.T) + (b_MD * b_MD).sum(1)[None]
    return d.clamp_min_(0.0)  # (N, M)


def _check(name: str, f: torch.Tensor, k: int = 0) -> torch.Tensor:
    if f.ndim != 2:
        raise ValueError(f"{name} features must be (N, D), got shape {tuple(f.shape)}")
    if f.shape[0] <= k:
        raise ValueError(f"{name} set has {f.shape[0]} points: a k={k} neighbourhood needs at least {k + 1}")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(f"{name} features contain NaN or Inf")
    return f.float()


@torch.no_grad()
def manifold_radii(feats_ND: torch.Tensor, k: int = 3, block_size: int = 10_000) -> torch.Tensor:
    """Squared distance of every point to its ``k``-th nearest neighbour in the same set, ``(N,)``.

    The point itself (distance 0) is the first of the ``k + 1`` smallest distances of its row;
    duplicates count as neighbours at distance 0.
    """
    f = _check("manifold", feats_ND, k)
    n = f.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=f.device)
    with exact_fp32(f.device):
        for i in range(0, n, block_size):
            best = None  # (b, k + 1) smallest squared distances seen so far, per row
            for j in range(0, n, block_size):
                d = _sq_dists(f[i : i + block_size], f[j : j + block_size])
                cand = d if best is None else torch.cat([best, d], 1)
                best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
            out[i : i + block_size] = best[:, k]
    return out


@torch.no_grad()
def in_manifold(points_MD: torch.Tensor, manifold_ND: torch.Tensor, radii_N: torch.Tensor,
                block_size: int = 10_000) -> torch.Tensor:
    """Whether each point lies in at least one ball ``|x - y_i|^2 <= radii_N[i]``: ``(M,)`` bool."""
    p, m = _check("evaluated", points_MD), _check("manifold", manifold_ND)
    if p.shape[1] != m.shape[1]:
        raise ValueError(f"feature dimensions differ: {p.shape[1]} and {m.shape[1]}")
    r = radii_N.to(m.device, torch.float32)
    inside = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
    with exact_fp32(p.device):
        for i in range(0, p.shape[0], block_size):
            for j in range(0, m.shape[0], block_size):
                d = _sq_dists(p[i : i + block_size], m[j : j + block_size].to(p.device))
                inside[i : i + block_size] |= (d <= r[j : j + block_size].to(p.device)[None]).any(1)
    return inside


@dataclass(frozen=True)
class PrecisionRecall:
    """Improved precision and recall, with what they were computed from."""

    precision: float
    recall: float
    k: int
    num_real: int
    num_fake: int


def precision_recall(real_ND: torch.Tensor, fake_MD: torch.Tensor, k: int = 3,
                     block_size: int = 10_000) -> PrecisionRecall:
    """Improved precision (fake in the real manifold) and recall (real in the fake manifold).

    Args:
        real_ND: reference features (ADM: pool3 of the 10k reference images).
        fake_MD: generated features (same dimension).
        k: neighbourhood size (3, as ADM and the paper's default).
        block_size: rows / columns of the distance blocks.
    """
    real, fake = torch.as_tensor(real_ND), torch.as_tensor(fake_MD)
    r_real = manifold_radii(real, k, block_size)
    r_fake = manifold_radii(fake, k, block_size)
    precision = in_manifold(fake, real, r_real, block_size).sum().item() / fake.shape[0]
    recall = in_manifold(real, fake, r_fake, block_size).sum().item() / real.shape[0]
    return PrecisionRecall(precision, recall, k, real.shape[0], fake.shape[0])
