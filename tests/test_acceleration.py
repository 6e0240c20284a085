"""models/networks/acceleration.py: every speed option computes what the plain model does, within the rounding
of the dtype it runs in.

The memories' hard threshold is discontinuous, so a comparison is only meaningful where no query's
weights lie within the compared rounding of 1/N: :func:`tie_free_detector` draws models whose
memory inputs keep a margin (tests/helpers.py), instead of loosening tolerances. The bfloat16
comparison uses the variant without memories ("ae+skip+"), since bfloat16's rounding (about 4e-3 a
layer) moves weights across any usable margin; the memories' own bfloat16 autocast path is
tested with the op (tests/test_amp.py).
"""
from __future__ import annotations

import copy
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.networks.acceleration import (FAST_INFERENCE, FAST_TRAINING, SpeedOptions, autocast_dtype, fast_score,
                                 fold_batchnorm, has_native_bf16, inference_context, inference_model,
                                 networks, training_networks)
from models.networks import AnomalyDetector, ModelConfig

from helpers import near_tie_rows

BATCH, SIZE = 2, 32


def randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Running statistics and affine parameters away from their initial 0/1, so folding is tested."""
    for norm in model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            c = norm.num_features
            norm.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            norm.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            with torch.no_grad():
                norm.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(c, generator=generator) * 0.1)


def memory_ties(model: AnomalyDetector, x: torch.Tensor, margin: float) -> bool:
    """Whether any memory of ``model`` sees a query within a relative ``margin`` of its threshold."""
    ties = []

    def check(memory, inputs, _output):
        ties.append(bool(near_tie_rows(inputs[0], memory.memory, memory.division, memory.similarity,
                                       memory.shrink, memory.threshold, memory.temperature,
                                       margin).any()))
    handles = [m.register_forward_hook(check) for m in model.memories()]
    with torch.no_grad():
        model.generator(x)
    for h in handles:
        h.remove()
    return any(ties)


def tie_free_detector(model: str = "daad+", dtype: torch.dtype = torch.float32, margin: float = 1e-4,
                      training: bool = False) -> tuple[AnomalyDetector, torch.Tensor]:
    """An eval-mode detector (randomised BatchNorm) and an input batch with no memory tie in
    eval mode, or with ``training`` in training mode (batch statistics)."""
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = AnomalyDetector(ModelConfig(model=model, size=SIZE, width=4, division=(2, 2, 1),
                                          num_items=20)).to(dtype)
        randomise_batchnorm(net, generator)
        net.eval()
        x = (torch.rand(BATCH, 3, SIZE, SIZE, generator=generator, dtype=dtype) * 2 - 1)
        if not memory_ties(copy.deepcopy(net).train(training), x, margin):
            return net, x
    raise AssertionError("no tie-free detector in 50 seeds")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


PLAIN = SpeedOptions()


def scores(net: AnomalyDetector, x: torch.Tensor, options: SpeedOptions = PLAIN):
    with inference_context(options, x.device):
        return list(net.score(x, ali_reduction="norm"))


def test_speed_options_describe_every_option_they_turn_on():
    """The commands' --no-fast help is written from the options, so each needs its words."""
    every = SpeedOptions(**{name: True for name in SpeedOptions.__dataclass_fields__})
    assert len(every.describe().split(", ")) == len(SpeedOptions.__dataclass_fields__)
    assert SpeedOptions().describe() == "none"
    assert FAST_INFERENCE.describe() == ("channels_last, BatchNorm folded, bfloat16 autocast where the device has it, "
                                         "freed memory kept")


def test_folding_batchnorm_is_exact_in_float64():
    net, x = tie_free_detector(dtype=torch.float64)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()), "the original is left alone"
    for fast, plain in zip(scores(folded, x), scores(net, x), strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)


def test_folding_leaves_a_convolution_without_batchnorm_alone():
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4)).eval()
    folded = fold_batchnorm(layers)
    assert [type(m) for m in folded] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.BatchNorm2d]


@pytest.mark.parametrize("options", [SpeedOptions(channels_last=True),
                                     SpeedOptions(channels_last=True, fold_batchnorm=True)],
                         ids=["channels_last", "channels_last+fold"])
def test_float32_options_match_the_plain_model(options):
    net, x = tie_free_detector()
    fast = inference_model(net, options)
    assert fast.generator.head[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not net.generator.head[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(scores(fast, x, options), scores(net, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not has_native_bf16("cpu"), reason="this CPU has no native bfloat16")
def test_bf16_autocast_is_within_bfloat16_rounding():
    net, x = tie_free_detector(model="ae+skip+")
    options = FAST_INFERENCE
    assert options.bf16 and autocast_dtype(options, "cpu") == torch.bfloat16
    fast, plain = scores(inference_model(net, options), x, options), scores(net, x)
    assert fast[0].dtype == torch.bfloat16, "the convolutions ran in bfloat16"
    for a, b in zip(fast, plain, strict=True):
        # About 2**-8 relative per layer, over the generator's 21 layers; float32's would be 1e-6.
        assert 1e-5 < relative_error(a, b) < 2e-2
    in_float32 = fast_score(inference_model(net, options), x, options, ali_reduction="norm")
    assert all(t.dtype == torch.float32 for t in in_float32)
    for a, b in zip(in_float32, fast, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=0, atol=0)


def test_bf16_is_off_without_native_support(monkeypatch):
    from models.networks import acceleration

    monkeypatch.setattr(acceleration, "has_native_bf16", lambda device: False)
    assert acceleration.autocast_dtype(SpeedOptions(bf16=True), "cpu") is None
    assert autocast_dtype(SpeedOptions(bf16=False), "cpu") is None


def test_compiled_inference_matches_the_plain_model():
    net, x = tie_free_detector()
    options = SpeedOptions(channels_last=True, fold_batchnorm=True, compile=True)
    fast = inference_model(net, options)
    assert set(fast.state_dict()) == set(fold_batchnorm(net).state_dict())  # compiled in place
    assert [type(m) for m in networks(fast)] == [type(m) for m in networks(net)]
    for a, b in zip(scores(fast, x, options), scores(net, x), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def one_training_backward(net: AnomalyDetector, modules: list, x: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of a reconstruction-plus-feature loss through the given generator and
    discriminator in training mode (batch statistics)."""
    net.train()
    generator, discriminator = modules
    out = generator(x)
    loss = (out.reconstruction - x).pow(2).mean() + discriminator(out.reconstruction)[1].pow(2).mean()
    loss.backward()
    return [p.grad for p in net.parameters() if p.grad is not None]  # D's classifier has none


def test_channels_last_training_keeps_the_parameters_and_the_gradients():
    net, x = tie_free_detector(training=True)
    fast = copy.deepcopy(net)
    parameters = list(fast.parameters())
    modules = training_networks(fast, SpeedOptions(channels_last=True))
    assert all(a is b for a, b in zip(fast.parameters(), parameters, strict=True)), "optimizers keep their parameters"
    assert fast.generator.encoder[0][0][0].weight.is_contiguous(memory_format=torch.channels_last)
    fast_grads, plain_grads = one_training_backward(fast, modules, x), one_training_backward(net, networks(net), x)
    exact = copy.deepcopy(net).double()
    exact_grads = one_training_backward(exact, networks(exact), x.double())
    assert len(fast_grads) == len(plain_grads) == len(exact_grads) > 0
    for a, b, r in zip(fast_grads, plain_grads, exact_grads, strict=True):
        # Within float32 rounding: no further from the float64 gradient than the plain float32
        # one is (a few times over, as the summation order differs), or than a few float32 ulps.
        error, plain_error = (a.double() - r).norm(), (b.double() - r).norm()
        assert error <= 4 * plain_error + 1e-6 * r.norm()


def test_the_fast_trainer_steps_as_the_plain_one():
    """FAST_TRAINING in the Trainer (channels_last, fused Adam): the same steps within float32
    rounding (a model without memories: no threshold to be on either side of)."""
    from models.training import TrainConfig, Trainer

    config = TrainConfig(model=ModelConfig(model="ae+skip+", size=32, width=4))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    plain, fast = (Trainer(config, torch.device("cpu"), speed=speed) for speed in (SpeedOptions(), FAST_TRAINING))
    assert fast.opt_g.defaults["fused"] and not plain.opt_g.defaults.get("fused")
    conv = next(m for m in fast.model.generator.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    for _ in range(2):
        plain.train_step(x)
        fast.train_step(x)
    for a, b in zip(fast.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # two Adam steps of at most 2e-4 each


#: Run in a fresh interpreter: page faults of filling 64 MB (above glibc's largest mmap threshold)
#: after three blocks of that size were allocated, filled and freed, on glibc's settled defaults,
#: then after an inference model with ``keep_freed_memory`` was made.
FAULTS_SCRIPT = """
import resource, torch
from models.networks import AnomalyDetector, ModelConfig
from models.networks.acceleration import SpeedOptions, inference_model, keep_freed_memory

def faults_of_a_block_once_settled():
    for _ in range(3):
        torch.ones(16 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

assert keep_freed_memory(False)
default = faults_of_a_block_once_settled()
inference_model(AnomalyDetector(ModelConfig(model="ae", size=32, width=4, division=(2, 2, 1))),
                SpeedOptions(keep_freed_memory=True))
print(default, faults_of_a_block_once_settled())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_kept_freed_memory_is_reused_without_page_faults():
    """By default glibc maps a 64 MB block afresh at each allocation (16,384 faults of 4 KiB
    pages); once an inference model with ``keep_freed_memory`` is made, the freed block is
    reused. The option is process-wide, hence a fresh interpreter.

    Measured once settled, as a detector's later batches are: PyTorch allocates with
    ``posix_memalign``, which in glibc 2.36 asks for the size plus the alignment plus 32 bytes,
    so the first freed block, exactly its size, cannot be reused when a small allocation made
    meanwhile sits right after it (about 1 run in 8 here, by where the heap starts). The next
    block is then taken from the heap's top and goes back to it when freed."""
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout
    default, kept = map(int, out.split())
    assert default >= 30 and kept <= default // 10, (default, kept)
