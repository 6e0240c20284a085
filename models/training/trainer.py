"""One optimisation step and the run's state: the training logic around the plain networks.

Example:
    >>> import torch
    >>> from models.networks import ModelConfig
    >>> from models.training import TrainConfig, Trainer
    >>> config = TrainConfig(model=ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1)))
    >>> trainer = Trainer(config, torch.device("cpu"))
    >>> sorted(trainer.train_step(torch.rand(2, 3, 32, 32) * 2 - 1))
    ['adv', 'ali', 'd', 'd_acc', 'd_reset', 'g', 'rec']
    >>> sorted(trainer.gradient_shares(torch.rand(2, 3, 32, 32) * 2 - 1))
    ['adv', 'ali', 'rec']
"""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import get_total_norm

from ..networks.acceleration import PLAIN, SpeedOptions, adam_options, training_networks
from ..networks.losses import (LossWeights, discriminator_accuracy, discriminator_loss, generator_loss,
                               generator_terms, weight_of)
from .amp import MixedPrecision
from .checkpoint import load_into, restore_networks
from .config import TrainConfig


class DivergenceError(RuntimeError):
    """A loss or a gradient of a training step is NaN or infinite: the run has diverged."""


def largest_gradient(module: torch.nn.Module) -> torch.Tensor:
    """max |grad| over the parameters of ``module``, on their device (NaN or inf if any is).

    ``amax`` and ``amin`` of each gradient rather than ``get_total_norm(..., inf)``: on a CPU the
    infinity norm's reduction is about 20x slower than ``amax`` (5.8 against 0.14 ms for a 2M-float
    memory bank, one core), a tenth of a 64x64 training step."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.stack([torch.maximum(g.amax(), -g.amin()) for g in grads]).max()


def generator_pass(generator: torch.nn.Module, discriminator: Optional[torch.nn.Module],
                   x: torch.Tensor) -> tuple[Any, Optional[torch.Tensor], dict[str, torch.Tensor]]:
    """The generator's output on ``x``, D's logit of ``x`` (None without a discriminator) and the
    adversarial arguments of :func:`models.networks.losses.generator_loss` (empty without one)."""
    out = generator(x)
    if discriminator is None:
        return out, None, {}
    logit_real, feature_real = discriminator(x)
    logit_fake, feature_fake = discriminator(out.reconstruction)
    return out, logit_real, dict(logit_fake=logit_fake, feature_real=feature_real.detach(),
                                 feature_fake=feature_fake)


def reinitialise(module: torch.nn.Module) -> None:
    """Fresh weights for every layer of ``module`` (PyTorch's default initialisation), as
    GANomaly re-initialises a collapsed discriminator; draws from torch's global RNG."""
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


class Trainer:
    """Holds the networks, their optimizers, the epoch count, the per-epoch history and the
    calibration; :meth:`end_epoch` is the one way the count, history and calibration change.

    With ``ddp=True`` (a process group must exist) the generator and discriminator are wrapped
    separately in DistributedDataParallel, so each optimizer step sees gradients averaged over
    all processes. ``self.model`` always holds the unwrapped networks. ``speed`` runs them faster
    within float32 rounding (:data:`~models.networks.acceleration.FAST_TRAINING`: channels_last,
    Adam's fused kernel); ``amp`` is the mixed precision.
    """

    def __init__(self, config: TrainConfig, device: torch.device, ddp: bool = False,
                 amp: Optional[torch.dtype] = None, speed: SpeedOptions = PLAIN) -> None:
        if ddp and config.d_reset and config.model.variant.adversarial:
            # Each process would decide on its own loss and draw its own fresh weights.
            raise ValueError("--d-reset is not supported with DistributedDataParallel (processes would "
                             "re-initialise the discriminator differently); train with --d-reset 0")
        self.config, self.device = config, device
        self.amp = MixedPrecision(device, amp)
        # Same seed on every process: identical initial weights (DDP also broadcasts rank 0's).
        torch.manual_seed(config.seed)
        self.model = config.detector().to(device)  # tiled in a tiled run: its steps see the crops
        training_networks(self.model, speed)  # layout and compilation in place, before DDP wraps them
        self.generator = self._wrap(self.model.generator, ddp)
        self.discriminator = (self._wrap(self.model.discriminator, ddp)
                              if self.model.discriminator is not None else None)
        adam = dict(lr=config.learning_rate, betas=config.betas, weight_decay=config.weight_decay,
                    **adam_options(speed, device))
        # The mean training image (``--model mean-image``) has nothing to optimise: it is fitted (:meth:`fit`).
        self.opt_g = torch.optim.Adam(self.model.generator.parameters(), **adam) if config.model.learns else None
        self.opt_d = (torch.optim.Adam(self.model.discriminator.parameters(), **adam)
                      if self.discriminator is not None else None)
        rec, adv, ali = config.loss_weights
        self.loss_weights = LossWeights(rec, adv, ali, config.memae_entropy_weight)
        self.reductions = dict(rec_reduction=config.rec_loss, ali_reduction=config.ali_loss)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.calibration: Optional[dict[str, float]] = None

    def _wrap(self, module: torch.nn.Module, ddp: bool) -> torch.nn.Module:
        if not ddp:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def train_step(self, x: torch.Tensor) -> dict[str, float]:
        """One generator step, then one discriminator step; returns the losses, with the
        discriminator's accuracy (``d_acc``, on x and the x_hat of before the step) and whether it
        was re-initialised after this step (``d_reset``, 1 or 0: its loss fell below
        ``config.d_reset``).

        The losses and the largest gradient of each network come from the device in one transfer
        at the end, the step's only host sync. If any is NaN or infinite, raises
        :class:`DivergenceError` naming them: the weights are then broken and must not be saved.
        The gradients stay in the parameters' ``.grad`` until the next step (tests read them).
        """
        if self.opt_g is None:
            raise ValueError(f"the {self.config.model.model} model is fitted, not trained: Trainer.fit")
        self.model.train()
        self.opt_g.zero_grad(set_to_none=True)
        with self.amp.autocast():
            out, logit_real, adversarial = generator_pass(self.generator, self.discriminator, x)
            x_hat = out.reconstruction
            loss_g, losses = generator_loss(x, x_hat, self.loss_weights, out.weights, **adversarial,
                                            **self.reductions)
        self.amp.backward(loss_g, self.opt_g)
        checks = {"generator gradient": largest_gradient(self.model.generator)}
        self.amp.step(self.opt_g)
        if self.discriminator is not None:
            # The generator's backward also filled the discriminator's .grad: clear it. D(x) is
            # reused (D has not changed yet); x_hat is detached so that D's loss leaves G alone.
            self.opt_d.zero_grad(set_to_none=True)
            with self.amp.autocast():
                logit_fake_d = self.discriminator(x_hat.detach())[0]
                loss_d = discriminator_loss(logit_real, logit_fake_d)
            self.amp.backward(loss_d, self.opt_d)
            checks["discriminator gradient"] = largest_gradient(self.model.discriminator)
            self.amp.step(self.opt_d)
            losses["d"] = loss_d.detach()
            losses["d_acc"] = discriminator_accuracy(logit_real, logit_fake_d)
        self.amp.update()
        if self.amp.scaling:  # a non-finite gradient is an overflow: the scaler skipped that step
            checks = {}
        values = dict(zip([*losses, *checks], torch.stack([*losses.values(), *checks.values()]).tolist()))
        broken = [f"{'loss' if name in losses else 'largest'} {name} = {value}"
                  for name, value in values.items() if not math.isfinite(value)]
        if broken:
            raise DivergenceError("non-finite " + ", ".join(broken))
        result = {name: values[name] for name in losses}
        if self.discriminator is not None:
            # GANomaly: a discriminator that wins outright gives the generator no signal; restart it.
            reset = self.config.d_reset > 0 and result["d"] < self.config.d_reset
            if reset:
                reinitialise(self.model.discriminator)
            result["d_reset"] = float(reset)
        return result

    def fit(self, dataset: Any) -> None:
        """Fits a model that is not trained (the mean training image) to ``dataset``'s images."""
        self.model.generator.fit(dataset)

    def gradient_shares(self, x: torch.Tensor) -> dict[str, float]:
        """Norm of the generator's gradient from each weighted loss term alone, as shares of their
        sum, on batch ``x``: which term drives the generator. Runs on copies of the networks, so
        the run (weights, BatchNorm statistics, optimizers, RNG) is left exactly as it was.
        """
        generator = copy.deepcopy(self.model.generator).train()
        discriminator = (copy.deepcopy(self.model.discriminator).train()
                         if self.model.discriminator is not None else None)
        with torch.random.fork_rng(devices=[]):
            out, _, adversarial = generator_pass(generator, discriminator, x)
            terms = generator_terms(x, out.reconstruction, self.loss_weights, out.weights,
                                    **adversarial, **self.reductions)
            params = [p for p in generator.parameters() if p.requires_grad]
            norms = {}
            for name, value in terms.items():
                grads = torch.autograd.grad(weight_of(self.loss_weights, name) * value, params,
                                            retain_graph=True, allow_unused=True)
                norms[name] = float(get_total_norm([g for g in grads if g is not None]))
        total = sum(norms.values()) or 1.0
        return {name: norm / total for name, norm in norms.items()}

    def end_epoch(self, record: dict[str, Any], calibration: Optional[dict[str, float]] = None) -> None:
        """Counts a finished epoch and keeps its log ``record`` and the ``calibration`` of the
        weights it ends with (:mod:`models.inference.calibration`): measured after the last epoch,
        None after the others, so that a resumed run never keeps one measured on older weights."""
        self.epoch += 1
        self.history.append(record)
        self.calibration = calibration

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds, in types that ``torch.load(weights_only=True)`` accepts."""
        model = self.model
        return {
            "config": self.config.to_dict(),
            "epoch": self.epoch,
            "generator": model.generator.state_dict(),
            "discriminator": model.discriminator.state_dict() if model.discriminator else None,
            "opt_g": self.opt_g.state_dict() if self.opt_g else None,
            "opt_d": self.opt_d.state_dict() if self.opt_d else None,
            "history": self.history,
            "calibration": self.calibration,
        }

    def load_state_dict(self, state: dict[str, Any], source: str = "the checkpoint") -> None:
        """Continues from a checkpoint's state (``source`` names it in errors).

        The config's learning rate replaces the stored one, so that a run resumed after a
        divergence can go on with a lower ``--lr``; the other optimizer settings are kept.
        """
        restore_networks(self.model, state, source)
        if self.opt_g is not None:
            load_into(self.opt_g, state, "opt_g", source)
        if self.opt_d is not None:
            load_into(self.opt_d, state, "opt_d", source)
        for optimizer in filter(None, (self.opt_g, self.opt_d)):
            for group in optimizer.param_groups:
                group["lr"] = self.config.learning_rate
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.calibration = state.get("calibration")
