"""Speed of the detector on a CPU (and a GPU): layouts, folding, bfloat16 and compilation.

Nothing here changes what the networks compute beyond the rounding of the dtype they run in:

* ``channels_last``: the convolutions' tensors in NHWC, which oneDNN's convolutions take without
  reordering every activation;
* ``fold_batchnorm`` (inference only): each eval-mode BatchNorm that follows a convolution is
  folded into that convolution's weight and bias (exact up to float rounding);
* ``bf16``: the forward under ``torch.autocast`` to bfloat16 where the device has native bfloat16
  arithmetic (AVX512-BF16 / AMX on a CPU, Ampere+ on CUDA); elsewhere it is left off;
* ``compile``: the generator and the discriminator under ``torch.compile`` (in place,
  ``nn.Module.compile``: names and state dicts stay as they are);
* ``fused_adam`` (training only): Adam's fused kernel, one pass over each parameter instead of
  about ten elementwise ops;
* ``keep_freed_memory``: glibc's malloc keeps freed memory for the next allocation instead of
  handing it back to the system (:func:`keep_freed_memory`; process-wide; nothing computed
  changes).

:data:`FAST_INFERENCE` and :data:`FAST_TRAINING` are the fastest correct combinations measured by
``benchmarks/detector.py`` (README, "The detector"); ``SpeedOptions()`` is the plain model.

Example:
    >>> import torch
    >>> from models.networks.acceleration import SpeedOptions, fast_score, inference_model
    >>> from models.networks import AnomalyDetector, ModelConfig
    >>> net = AnomalyDetector(ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1))).eval()
    >>> options = SpeedOptions(channels_last=True, fold_batchnorm=True)
    >>> fast = inference_model(net, options)
    >>> x = torch.rand(2, 3, 32, 32) * 2 - 1
    >>> torch.allclose(fast_score(fast, x, options, ali_reduction="norm").rec,
    ...                net.score(x, ali_reduction="norm").rec, atol=1e-6)
    True
"""
from __future__ import annotations

import copy
import ctypes
import itertools
import platform
from contextlib import ExitStack
from dataclasses import dataclass
from typing import ContextManager, Optional, Union

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from daad_ext import BlockMemory, available_backends
from daad_ext.autocast import run_dtype

from .detector import AnomalyDetector, Scores


@dataclass(frozen=True)
class SpeedOptions:
    """What :func:`inference_model` / :func:`training_networks` change; all off is the plain model."""

    channels_last: bool = False
    fold_batchnorm: bool = False
    bf16: bool = False
    compile: bool = False
    fused_adam: bool = False
    keep_freed_memory: bool = False

    def describe(self) -> str:
        """The options that are on, in words (the commands' help says what ``--no-fast`` turns off)."""
        words = {"channels_last": "channels_last", "fold_batchnorm": "BatchNorm folded",
                 "bf16": "bfloat16 autocast where the device has it", "compile": "torch.compile",
                 "fused_adam": "Adam's fused kernel", "keep_freed_memory": "freed memory kept"}
        return ", ".join(text for name, text in words.items() if getattr(self, name)) or "none"


#: The plain model: eager float32, what the exported graph computes.
PLAIN = SpeedOptions()
#: The fastest correct inference on this project's CPU, as benchmarks/detector.py measures it
#: (figures: README, "The detector"). Compilation is left out: it gains little or nothing and is
#: repaid only after many batches.
FAST_INFERENCE = SpeedOptions(channels_last=True, fold_batchnorm=True, bf16=True, keep_freed_memory=True)
#: The fastest training step that keeps float32 results up to float32 rounding (same benchmark):
#: bfloat16, faster still, changes the training's numbers beyond that, so it stays the separate
#: ``--amp bf16`` of ``models.train``.
FAST_TRAINING = SpeedOptions(channels_last=True, fused_adam=True, keep_freed_memory=True)

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: glibc's largest mmap threshold on 64-bit, where its dynamic threshold settles (DEFAULT_MMAP_THRESHOLD_MAX).
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20


def has_native_bf16(device: Union[str, torch.device]) -> bool:
    """Whether ``device`` does bfloat16 arithmetic in hardware (else autocast to it only emulates)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(options: SpeedOptions, device: Union[str, torch.device]) -> Optional[torch.dtype]:
    """bfloat16 where ``options.bf16`` asks for it and ``device`` has it natively, else None."""
    return torch.bfloat16 if options.bf16 and has_native_bf16(device) else None


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` in which every ``BatchNorm2d`` that directly follows a
    ``Conv2d`` in an ``nn.Sequential`` is folded into the convolution (and replaced by Identity)."""
    folded = copy.deepcopy(module).eval()
    for sequence in folded.modules():
        if not isinstance(sequence, nn.Sequential):
            continue
        names = list(sequence._modules)
        for conv_name, norm_name in zip(names, names[1:]):
            conv, norm = sequence._modules[conv_name], sequence._modules[norm_name]
            if type(conv) is nn.Conv2d and isinstance(norm, nn.BatchNorm2d):
                sequence._modules[conv_name] = fuse_conv_bn_eval(conv, norm)
                sequence._modules[norm_name] = nn.Identity()
    return folded


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (the CPU if it has none)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def store_in_autocast_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Stores in ``dtype``, in place, the parameters that autocast to ``dtype`` would cast at every
    call: those of convolutions, and the memory of each ``BlockMemory`` whose kernel runs in
    ``dtype`` (:func:`daad_ext.autocast.run_dtype`). The same values are rounded the same way,
    once: at 256x256 the weights and memory banks are 86M values, 340 MB of float32 that the casts
    read at every batch. Run the module under autocast to ``dtype`` afterwards."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            layer.to(dtype)
        elif isinstance(layer, BlockMemory):
            device = layer.memory.device
            if run_dtype(layer.backend, dtype, lambda d: available_backends(device, d)) == dtype:
                layer.to(dtype)


def keep_freed_memory(keep: bool = True) -> bool:
    """Makes glibc's malloc, for the whole process, keep freed memory for later allocations
    (``keep``), or go back to what its defaults settle at (``keep=False``). Returns whether
    this process's C library is glibc (elsewhere nothing changes).

    By default glibc gives every allocation above its mmap threshold (at most 32 MB) its own
    mapping and unmaps it when freed, and returns the heap's free top to the system: every batch
    then faults in its large activations afresh, page by page, each page zeroed by the kernel.
    At 256x256 that is about a million page faults an inference batch and more for a training
    step, a large share of the plain model's time (benchmarks/detector.py; README, "The detector").
    Kept, the heap stays at its high-water mark (a larger peak resident size) and the faults stop
    after the first batch. ``keep=False`` sets glibc's settled defaults (mmap above 32 MB, trim
    above 64 MB) explicitly: memory kept so far stays in the heap."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    if keep:
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2 ** 31 - 1}
    else:
        settings = {_M_MMAP_MAX: 65536, _M_MMAP_THRESHOLD: _GLIBC_MMAP_THRESHOLD_MAX,
                    _M_TRIM_THRESHOLD: 2 * _GLIBC_MMAP_THRESHOLD_MAX}
    return all(mallopt(param, value) == 1 for param, value in settings.items())


def networks(model: AnomalyDetector) -> list[nn.Module]:
    """The generator and, for the "+" variants, the discriminator."""
    return [model.generator] + ([model.discriminator] if model.discriminator is not None else [])


def inference_model(model: AnomalyDetector, options: SpeedOptions) -> AnomalyDetector:
    """An eval-mode copy of ``model`` prepared by ``options`` (``model`` is left as it was); run
    it under :func:`inference_context`. ``fused_adam`` does not apply."""
    fast = fold_batchnorm(model) if options.fold_batchnorm else copy.deepcopy(model).eval()
    if options.keep_freed_memory:
        keep_freed_memory()
    if options.channels_last:
        fast.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(options, device_of(fast))
    if dtype is not None:
        store_in_autocast_dtype(fast, dtype)
    if options.compile:
        # Freezing makes the weights constants of the compiled graph, so that oneDNN's convolutions
        # can get their weights packed once instead of reordered at every call.
        for network in networks(fast):
            network.compile(options={"freezing": True})
    return fast


def inference_context(options: SpeedOptions, device: Union[str, torch.device]) -> ContextManager:
    """No autograd, and bfloat16 autocast where :func:`autocast_dtype` gives it."""
    stack = ExitStack()
    stack.enter_context(torch.inference_mode())
    dtype = autocast_dtype(options, device)
    if dtype is not None:
        stack.enter_context(torch.autocast(torch.device(device).type, dtype=dtype))
    return stack


def fast_score(model: AnomalyDetector, x: torch.Tensor, options: SpeedOptions, **score_options: str) -> Scores:
    """``model.score(x, **score_options)`` under :func:`inference_context`, every tensor in float32
    (under bfloat16 autocast the reconstruction and L(x) come out in bfloat16, which numpy cannot
    take)."""
    with inference_context(options, x.device):
        scores = model.score(x, **score_options)
    return Scores(*(None if t is None else t.float() for t in scores))


def training_networks(model: AnomalyDetector, options: SpeedOptions) -> list[nn.Module]:
    """The networks to run in the training step, prepared by ``options``: ``model``'s parameters
    change layout in place (the same ``Parameter`` objects, so existing optimizers keep them),
    and with ``compile`` the generator and discriminator are compiled in place. Returns
    :func:`networks` of ``model``. ``fold_batchnorm`` does not apply (batch statistics train);
    ``bf16`` is the trainer's mixed precision (:func:`autocast_dtype`); ``fused_adam``:
    :func:`adam_options`; ``keep_freed_memory``: :func:`keep_freed_memory`."""
    if options.keep_freed_memory:
        keep_freed_memory()
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    if options.compile:
        for network in networks(model):
            network.compile()
    return networks(model)


def adam_options(options: SpeedOptions, device: Union[str, torch.device]) -> dict[str, bool]:
    """Keyword arguments for ``torch.optim.Adam``: its fused kernel where ``options.fused_adam``
    asks for it (CPU and CUDA have one), else the default."""
    return {"fused": True} if options.fused_adam and torch.device(device).type in ("cpu", "cuda") else {}
