"""The training losses of DAAD+ (paper Sec. 3.3) and MemAE's entropy loss.

Generator: ``w_rec L_rec + w_adv L_adv + w_ali L_ali`` (+ MemAE's entropy term for that baseline).

How L_rec and L_ali reduce their differences is a *reading* of the paper, chosen per run:

==============  ==========================================================================
``rec``         L_rec, per image, then the batch mean
==============  ==========================================================================
``"mse"``       mean squared error over pixels and channels
``"norm"``      L2 norm of x - x_hat (the paper's Eq. 4, ``E ||x - x_hat||_2``)
``"l1"``        mean absolute error (GANomaly / Skip-GANomaly's contextual loss)
``"ssim"``      mean of 1 - SSIM (Bergmann et al., VISAPP 2019; :mod:`models.networks.maps`)
==============  ==========================================================================

==============  ==========================================================================
``ali``         L_ali, per image, then the batch mean
==============  ==========================================================================
``"sum_sq"``    squared L2 distance of the 100-d features, summed (this project's first reading)
``"norm"``      L2 distance (the paper's Eq. 6, ``E ||f_D(x) - f_D(x_hat)||_2``)
``"mean_sq"``   mean squared difference (GANomaly / Skip-GANomaly's feature-matching loss)
==============  ==========================================================================

The score L(x) uses the same per-image reduction as the loss (:func:`feature_distance`).

Example:
    >>> import torch
    >>> from models.networks.losses import LossWeights, generator_loss
    >>> x = torch.zeros(2, 1, 4, 4)
    >>> total, parts = generator_loss(x, x + 0.5, LossWeights(rec=50.0))
    >>> float(total), float(parts["rec"])
    (12.5, 0.25)
    >>> total, parts = generator_loss(x, x + 0.5, LossWeights(rec=1.0), rec_reduction="norm")
    >>> float(parts["rec"])  # sqrt(16 * 0.25)
    2.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .maps import ssim

#: Floor inside MemAE's entropy log (its code uses 1e-12 as well).
ENTROPY_EPS = 1e-12
REC_REDUCTIONS = ("mse", "norm", "l1", "ssim")
ALI_REDUCTIONS = ("sum_sq", "norm", "mean_sq")
#: Floor under the square root of a norm: its gradient at 0 would be infinite.
NORM_EPS = 1e-12


@dataclass(frozen=True)
class LossWeights:
    rec: float = 50.0
    adv: float = 0.5
    ali: float = 0.5
    entropy: float = 0.0


def check_reductions(rec: str, ali: str) -> None:
    if rec not in REC_REDUCTIONS:
        raise ValueError(f"unknown reconstruction loss {rec!r}; choose one of {REC_REDUCTIONS}")
    if ali not in ALI_REDUCTIONS:
        raise ValueError(f"unknown alignment loss {ali!r}; choose one of {ALI_REDUCTIONS}")


def _norm(squares: torch.Tensor) -> torch.Tensor:
    return squares.clamp_min(NORM_EPS).sqrt()


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor, reduction: str = "mse") -> torch.Tensor:
    """L_rec, reduced per image by ``reduction`` (see the module docstring), then the batch mean."""
    diff = (x - x_hat).flatten(1)
    if reduction == "mse":
        return diff.pow(2).mean()
    if reduction == "l1":
        return diff.abs().mean()
    if reduction == "norm":
        return _norm(diff.pow(2).sum(dim=1)).mean()
    if reduction == "ssim":
        return (1 - ssim(x, x_hat)).mean()
    raise ValueError(f"unknown reconstruction loss {reduction!r}; choose one of {REC_REDUCTIONS}")


def feature_distance(feature_real: torch.Tensor, feature_fake: torch.Tensor,
                     reduction: str = "sum_sq") -> torch.Tensor:
    """Per-image (B,) distance of f_D(x) and f_D(x_hat): L_ali before the batch mean, and L(x)."""
    squares = (feature_real - feature_fake).pow(2)
    if reduction == "sum_sq":
        return squares.sum(dim=1)
    if reduction == "mean_sq":
        return squares.mean(dim=1)
    if reduction == "norm":
        return _norm(squares.sum(dim=1))
    raise ValueError(f"unknown alignment loss {reduction!r}; choose one of {ALI_REDUCTIONS}")


def alignment_loss(feature_real: torch.Tensor, feature_fake: torch.Tensor,
                   reduction: str = "sum_sq") -> torch.Tensor:
    """L_ali: :func:`feature_distance` averaged over the batch."""
    return feature_distance(feature_real, feature_fake, reduction).mean()


def adversarial_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """L_adv for the generator: BCE of D(x_hat) against the label "real"."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """BCE on real (label 1) and reconstructed (label 0) images, averaged over the two."""
    real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
    fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
    return 0.5 * (real + fake)


def discriminator_accuracy(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Share of real images called real and reconstructions called fake (0-d, detached)."""
    right = torch.cat([logit_real.detach() > 0, logit_fake.detach() < 0])
    return right.float().mean()


def entropy_loss(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """MemAE's entropy of the addressing weights, mean over queries, summed over memories."""
    return torch.stack([-(w * torch.log(w + ENTROPY_EPS)).sum(dim=-1).mean() for w in weights]).sum()


def generator_terms(x: torch.Tensor, x_hat: torch.Tensor, weights: LossWeights,
                    memory_weights: Sequence[torch.Tensor] = (),
                    logit_fake: Optional[torch.Tensor] = None,
                    feature_real: Optional[torch.Tensor] = None,
                    feature_fake: Optional[torch.Tensor] = None,
                    rec_reduction: str = "mse", ali_reduction: str = "sum_sq") -> dict[str, torch.Tensor]:
    """Each term of the generator's loss, unweighted: ``rec``, and ``adv``, ``ali`` when the
    discriminator's outputs are given, ``ent`` when ``weights.entropy`` is non-zero."""
    terms = {"rec": reconstruction_loss(x, x_hat, rec_reduction)}
    if logit_fake is not None:
        terms["adv"] = adversarial_loss(logit_fake)
        terms["ali"] = alignment_loss(feature_real, feature_fake, ali_reduction)
    if weights.entropy:
        terms["ent"] = entropy_loss(memory_weights)
    return terms


def weight_of(weights: LossWeights, term: str) -> float:
    return {"rec": weights.rec, "adv": weights.adv, "ali": weights.ali, "ent": weights.entropy}[term]


def generator_loss(x: torch.Tensor, x_hat: torch.Tensor, weights: LossWeights,
                   memory_weights: Sequence[torch.Tensor] = (),
                   logit_fake: Optional[torch.Tensor] = None,
                   feature_real: Optional[torch.Tensor] = None,
                   feature_fake: Optional[torch.Tensor] = None,
                   rec_reduction: str = "mse",
                   ali_reduction: str = "sum_sq") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's total loss and its parts (detached 0-d tensors, for logging and checks:
    the caller fetches them from the device in one go).

    The adversarial terms are included when the discriminator's outputs are given; the entropy
    term when ``weights.entropy`` is non-zero. ``feature_real`` should be detached: it is a target.
    """
    terms = generator_terms(x, x_hat, weights, memory_weights, logit_fake, feature_real, feature_fake,
                            rec_reduction, ali_reduction)
    total = sum(weight_of(weights, name) * value for name, value in terms.items())
    parts = {name: value.detach() for name, value in terms.items()}
    parts["g"] = total.detach()
    return total, parts
