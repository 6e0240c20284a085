"""One optimisation step and the run's state: the training logic around the plain networks.

Example:
    >>> import torch
    >>> from models.config import ModelConfig, TrainConfig
    >>> from models.trainer import Trainer
    >>> config = TrainConfig(model=ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1)))
    >>> trainer = Trainer(config, torch.device("cpu"))
    >>> sorted(trainer.train_step(torch.rand(2, 3, 32, 32) * 2 - 1))
    ['adv', 'ali', 'd', 'g', 'rec']
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

from .config import TrainConfig
from .losses import LossWeights, discriminator_loss, generator_loss
from .networks import AnomalyDetector


class Trainer:
    """Holds the networks, their optimizers, the epoch count and the per-epoch history.

    With ``ddp=True`` (a process group must exist) the generator and discriminator are wrapped
    separately in DistributedDataParallel, so each optimizer step sees gradients averaged over
    all processes. ``self.model`` always holds the unwrapped networks.
    """

    def __init__(self, config: TrainConfig, device: torch.device, ddp: bool = False) -> None:
        self.config, self.device = config, device
        # Same seed on every process: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        self.model = AnomalyDetector(config.model).to(device)
        self.generator = self._wrap(self.model.generator, ddp)
        self.discriminator = (self._wrap(self.model.discriminator, ddp)
                              if self.model.discriminator is not None else None)
        adam = dict(lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay)
        self.opt_g = torch.optim.Adam(self.model.generator.parameters(), **adam)
        self.opt_d = (torch.optim.Adam(self.model.discriminator.parameters(), **adam)
                      if self.discriminator is not None else None)
        rec, adv, ali = config.loss_weights
        self.loss_weights = LossWeights(rec, adv, ali, config.memae_entropy_weight)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.calibration: Optional[dict[str, float]] = None

    def _wrap(self, module: torch.nn.Module, ddp: bool) -> torch.nn.Module:
        if not ddp:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One generator step, then one discriminator step; returns the losses.

        The gradients stay in the parameters' ``.grad`` until the next step (tests read them).
        """
        self.model.train()
        self.opt_g.zero_grad(set_to_none=True)
        out = self.generator(x)
        x_hat = out.reconstruction
        adversarial = {}
        if self.discriminator is not None:
            logit_real, feature_real = self.discriminator(x)
            logit_fake, feature_fake = self.discriminator(x_hat)
            adversarial = dict(logit_fake=logit_fake, feature_real=feature_real.detach(),
                               feature_fake=feature_fake)
        loss_g, losses = generator_loss(x, x_hat, self.loss_weights, out.weights, **adversarial)
        loss_g.backward()
        self.opt_g.step()
        if self.discriminator is not None:
            # The generator's backward also filled the discriminator's .grad: clear it. D(x) is
            # reused (D has not changed yet); x_hat is detached so that D's loss leaves G alone.
            self.opt_d.zero_grad(set_to_none=True)
            loss_d = discriminator_loss(logit_real, self.discriminator(x_hat.detach())[0])
            loss_d.backward()
            self.opt_d.step()
            losses["d"] = loss_d.item()
        return losses

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds, in types that ``torch.load(weights_only=True)`` accepts."""
        model = self.model
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "generator": model.generator.state_dict(),
            "discriminator": model.discriminator.state_dict() if model.discriminator else None,
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "history": self.history,
            "calibration": self.calibration,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        if self.model.discriminator is not None:
            self.model.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.calibration = state.get("calibration")
