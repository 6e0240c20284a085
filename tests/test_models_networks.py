"""models/: the networks of every variant, their sizes, and one training step of each."""
from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from models.networks import MEAN_IMAGE, MODEL_NAMES, AnomalyDetector, Discriminator, ModelConfig, check_size, parse_model
from models.training import DivergenceError, TrainConfig, Trainer
from models.training.trainer import largest_gradient

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = dict(size=32, width=4, division=(2, 2, 1), num_items=16, backend="auto")


def test_model_names_cover_the_ablation():
    assert set(MODEL_NAMES) >= {"ae", "ae+skip", "memae", "daad", "daad+", "ae+", "memae+"}
    assert parse_model("daad+") == (True, "block", True)
    assert parse_model("ae+skip") == (True, "none", False)
    assert parse_model("memae+") == (False, "pixel", True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_of_every_variant(name):
    config = ModelConfig(model=name, in_channels=3, **SMALL)
    net = AnomalyDetector(config)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = net.generator(x)
    assert out.reconstruction.shape == x.shape
    variant = config.variant
    expected_memories = {"none": 0, "pixel": 1, "block": 4}[variant.memory]
    assert len(net.memories()) == len(out.weights) == expected_memories
    for memory, w in zip(net.memories(), out.weights):
        assert w.shape == (2, memory.geometry.num_queries, 16)
    if variant.memory == "pixel":  # MemAE: one item per pixel of the 2x2 map at H/16, MemAE's addressing
        (memory,) = net.memories()
        assert memory.division == (2, 2, 1) and memory.memory.shape == (16, 8 * 4)
        assert (memory.similarity, memory.shrink, memory.threshold) == ("dot", "memae", 0.0025)
    if variant.memory == "block":  # DAAD: the same division at H/2..H/16, cosine and hard shrinkage
        assert [m.memory.shape[1] for m in net.memories()] == [4 * 8 * 8, 8 * 4 * 4, 16 * 2 * 2, 32 * 1 * 1]
        assert all((m.division, m.similarity, m.shrink) == ((2, 2, 1), "cosine", "hard") for m in net.memories())
    assert (net.discriminator is not None) == variant.adversarial
    net.eval()
    scores = net.score(x)
    assert scores.error_map.shape == (2, 32, 32) and scores.rec.shape == (2,)
    assert (scores.feat is not None) == variant.adversarial


def test_one_channel_input():
    net = AnomalyDetector(ModelConfig(model="daad+", in_channels=1, **SMALL))
    assert net.generator(torch.zeros(2, 1, 32, 32)).reconstruction.shape == (2, 1, 32, 32)
    assert net.discriminator(torch.zeros(2, 1, 32, 32))[1].shape == (2, 100)


@pytest.mark.parametrize("size, convs", [(256, 6), (64, 4), (32, 3), (48, 3), (16, 2)])
def test_discriminator_depth_follows_table_8(size, convs):
    d = Discriminator(3, size, 2)
    strided = [m for m in d.features if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == convs
    assert [m.out_channels for m in strided] == [2 * 2 ** k for k in range(convs)]
    norms = [m for m in d.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == convs - 1  # none after the first conv
    logit, feature = d(torch.randn(2, 3, size, size))
    assert logit.shape == (2,) and feature.shape == (2, 100)


@pytest.mark.parametrize("name, backend", [(name, "auto") for name in MODEL_NAMES if name != MEAN_IMAGE] +
                         [("daad+", "reference"), ("memae", "reference")])
def test_one_training_step_of_every_variant(name, backend):
    config = TrainConfig(model=ModelConfig(model=name, **{**SMALL, "backend": backend}), seed=1)
    trainer = Trainer(config, torch.device("cpu"))
    before = [m.memory.detach().clone() for m in trainer.model.memories()]
    losses = trainer.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert ("d" in losses) == ("adv" in losses) == config.model.variant.adversarial
    assert ("ent" in losses) == (config.model.variant.memory == "pixel")
    for p in trainer.model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    for memory, old in zip(trainer.model.memories(), before):
        assert memory.memory.grad.abs().sum() > 0, f"no gradient reaches {memory}"
        assert not torch.equal(memory.memory.detach(), old)


def test_a_non_finite_loss_or_gradient_stops_the_step():
    config = TrainConfig(model=ModelConfig(model="daad+", **SMALL), seed=1)
    trainer = Trainer(config, torch.device("cpu"))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with pytest.raises(DivergenceError, match=r"non-finite loss rec = nan, .*loss g = nan"):
        trainer.train_step(x.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    # Finite losses, an infinite gradient (as an overflow in the backward pass would give).
    trainer = Trainer(config, torch.device("cpu"))
    last = list(trainer.model.discriminator.parameters())[-1]
    last.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(DivergenceError, match=r"^non-finite largest discriminator gradient = inf$"):
        trainer.train_step(x)


@pytest.mark.parametrize("special", [None, float("nan"), float("inf"), -float("inf")])
def test_largest_gradient_is_the_infinity_norm(special):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(5, 2))
    for i, p in enumerate(net.parameters()):
        p.grad = torch.randn_like(p) * (i + 1)
    first = next(net.parameters()).grad
    first.view(-1)[3] = -40.0 if special is None else special  # the largest is negative, or not finite
    expected = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()], norm_type=math.inf)
    torch.testing.assert_close(largest_gradient(net), expected, equal_nan=True)


def test_learning_rate_and_gamma_defaults_follow_the_paper():
    daad = TrainConfig(model=ModelConfig(model="daad", **SMALL))
    plus = TrainConfig(model=ModelConfig(model="daad+", **SMALL))
    assert (daad.learning_rate, plus.learning_rate) == (1e-4, 2e-4)
    assert (daad.fusion_gamma, plus.fusion_gamma) == (1.0, 0.9)
    assert daad.loss_weights == (50.0, 0.5, 0.5) and daad.betas == (0.9, 0.999) and daad.batch == 8
    assert TrainConfig(model=ModelConfig(model="memae", **SMALL)).memae_entropy_weight == 0.0002
    assert TrainConfig(model=ModelConfig(model="daad", **SMALL), lr=3e-3).learning_rate == 3e-3


@pytest.mark.parametrize("size, division", [(64, (8, 8, 1)), (40, (1, 1, 1)), (96, (4, 4, 1)), (8, (1, 1, 1))])
def test_bad_sizes_name_the_valid_ones(size, division):
    with pytest.raises(ValueError, match=r"input size .* valid sizes are the multiples of"):
        ModelConfig(model="daad", size=size, division=division)


def test_valid_sizes():
    check_size(128, (8, 8, 1))
    check_size(48, (3, 1, 1))
    ModelConfig(model="memae", size=48, width=4)  # MemAE's memory is pixel-wise: any multiple of 16
    ModelConfig(model="ae", size=16, width=4)
    with pytest.raises(ValueError, match="rc=3"):
        ModelConfig(model="daad", size=32, width=4, division=(1, 1, 3))
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig(model="gan")
    with pytest.raises(ValueError, match="unknown backend"):
        ModelConfig(model="daad", backend="fast")


@pytest.mark.parametrize("module", [
    "models", "models.data", "models.data.images", "models.data.registry", "models.networks.baseline",
    "models.networks.config", "models.networks.detector", "models.networks.discriminator",
    "models.networks.generator", "models.networks.losses", "models.training.amp", "models.training.atomic",
    "models.training.checkpoint", "models.training.config", "models.training.distributed",
    "models.training.trainer", "models.inference.metrics", "models.inference.plots", "models.inference.scorer",
    "models.inference.scores", "models.study.plan"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_mean_image_is_fitted_not_trained():
    trainer = Trainer(TrainConfig(model=ModelConfig(model=MEAN_IMAGE, size=16)), torch.device("cpu"))
    assert trainer.opt_g is None and list(trainer.model.parameters()) == []
    with pytest.raises(ValueError, match="the mean-image model is fitted, not trained"):
        trainer.train_step(torch.zeros(2, 3, 16, 16))
    trainer.fit([{"image": torch.zeros(3, 16, 16)}, {"image": torch.ones(3, 16, 16)}])
    assert torch.equal(trainer.model.generator.mean, torch.full((3, 16, 16), 0.5))
