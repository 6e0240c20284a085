"""The training losses of DAAD+ (paper Sec. 3.3) and MemAE's entropy loss.

Generator: ``50 L_rec + 0.5 L_adv + 0.5 L_ali`` (+ MemAE's entropy term for that baseline).

Example:
    >>> import torch
    >>> from models.losses import LossWeights, generator_loss
    >>> x = torch.zeros(2, 1, 4, 4)
    >>> total, parts = generator_loss(x, x + 0.5, LossWeights(rec=50.0))
    >>> float(total), float(parts["rec"])
    (12.5, 0.25)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

#: Floor inside MemAE's entropy log (its code uses 1e-12 as well).
ENTROPY_EPS = 1e-12


@dataclass(frozen=True)
class LossWeights:
    rec: float = 50.0
    adv: float = 0.5
    ali: float = 0.5
    entropy: float = 0.0


def reconstruction_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """L_rec: mean squared error over all pixels and channels."""
    return F.mse_loss(x_hat, x)


def alignment_loss(feature_real: torch.Tensor, feature_fake: torch.Tensor) -> torch.Tensor:
    """L_ali: squared L2 distance of f_D(x) and f_D(x_hat), summed over features, batch mean."""
    return (feature_real - feature_fake).pow(2).sum(dim=1).mean()


def adversarial_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """L_adv for the generator: BCE of D(x_hat) against the label "real"."""
    return F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """BCE on real (label 1) and reconstructed (label 0) images, averaged over the two."""
    real = F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
    fake = F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
    return 0.5 * (real + fake)


def entropy_loss(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """MemAE's entropy of the addressing weights, mean over queries, summed over memories."""
    return torch.stack([-(w * torch.log(w + ENTROPY_EPS)).sum(dim=-1).mean() for w in weights]).sum()


def generator_loss(x: torch.Tensor, x_hat: torch.Tensor, weights: LossWeights,
                   memory_weights: Sequence[torch.Tensor] = (),
                   logit_fake: Optional[torch.Tensor] = None,
                   feature_real: Optional[torch.Tensor] = None,
                   feature_fake: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The generator's total loss and its parts (detached 0-d tensors, for logging and checks:
    the caller fetches them from the device in one go).

    The adversarial terms are included when the discriminator's outputs are given; the entropy
    term when ``weights.entropy`` is non-zero. ``feature_real`` should be detached: it is a target.
    """
    rec = reconstruction_loss(x, x_hat)
    total = weights.rec * rec
    parts = {"rec": rec.detach()}
    if logit_fake is not None:
        adv, ali = adversarial_loss(logit_fake), alignment_loss(feature_real, feature_fake)
        total = total + weights.adv * adv + weights.ali * ali
        parts.update(adv=adv.detach(), ali=ali.detach())
    if weights.entropy:
        ent = entropy_loss(memory_weights)
        total = total + weights.entropy * ent
        parts["ent"] = ent.detach()
    parts["g"] = total.detach()
    return total, parts
