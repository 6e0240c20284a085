"""Mixed precision: block_memory / BlockMemory under torch.autocast (daad_ext/autocast.py) and
``python -m models.train --amp``.

Under autocast the op runs in the autocast dtype where the backend has a kernel for it, else in
float32; either way it must give exactly what the op gives on inputs cast by hand outside
autocast, and the gradient must reach the float32 memory in float32.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from daad_ext import BlockMemory, available_backends, block_memory, ops
from daad_ext.autocast import run_dtype

from helpers import tie_free_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIVISION = (2, 2, 1)
#: bf16 rounds at about 4e-3: inputs whose float64 weights keep 2% from the threshold keep their
#: kept set when a compiled reference sums in another order.
MARGIN = 0.02
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def backends_on(device: str) -> list[str]:
    """Every backend that runs float32 on ``device`` in this process, and "auto"."""
    return ["auto"] + available_backends(device, torch.float32)


def expected_dtype(backend: str, device: str, cast: torch.dtype) -> torch.dtype:
    """What the module documents: the autocast dtype where the backend runs it, else float32;
    "auto" prefers a fused kernel in float32 to the reference in the autocast dtype."""
    in_cast = available_backends(device, cast)
    if backend == "auto":
        fused_cast = in_cast[0] != "reference"
        fused_float32 = available_backends(device, torch.float32)[0] != "reference"
        return cast if fused_cast or not fused_float32 else torch.float32
    return cast if backend in in_cast else torch.float32


def by_hand(x, memory, backend, dtype):
    """The op outside autocast on inputs cast by hand: what autocast must reproduce."""
    x = x.detach().requires_grad_()
    memory = memory.detach().requires_grad_()
    y, w = block_memory(x.to(dtype), memory.to(dtype), DIVISION, backend=backend)
    return y, w, x, memory


def check_autocast(device: str, backend: str, cast: torch.dtype, compile_: bool = False) -> None:
    x, memory = tie_free_inputs((2, 4, 4, 4), 12, DIVISION, margin=MARGIN, device=device)
    x, memory = x.to(cast).float(), memory.to(cast).float()  # exact in bf16/fp16: no rounding below
    dtype = expected_dtype(backend, device, cast)
    y_ref, w_ref, x_ref, m_ref = by_hand(x, memory, backend, dtype)
    grad_y = torch.randn(y_ref.shape, device=device).to(dtype)
    torch.autograd.backward([y_ref, w_ref], [grad_y, w_ref.detach()])

    xs, ms = x.detach().requires_grad_(), memory.detach().requires_grad_()
    op = lambda a, b: block_memory(a, b, DIVISION, backend=backend)  # noqa: E731
    if compile_:
        op = torch.compile(op, fullgraph=True)
    with torch.autocast(device, dtype=cast):
        y, w = op(xs, ms)
    assert y.dtype == w.dtype == dtype
    torch.autograd.backward([y, w], [grad_y, w.detach()])
    assert ms.grad.dtype == xs.grad.dtype == torch.float32  # back to the float32 leaves
    # Eager: the same kernels on the same values, so the same numbers. Compiled: Inductor keeps a
    # half-type reference's intermediates in float32, eager rounds each to the half type.
    tol = dict(atol=2e-2, rtol=2e-2) if compile_ and dtype != torch.float32 else {}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(w, w_ref, **tol)
    torch.testing.assert_close(ms.grad, m_ref.grad, **tol)
    torch.testing.assert_close(xs.grad, x_ref.grad, **tol)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_cpu_bf16_autocast(backend):
    check_autocast("cpu", backend, torch.bfloat16)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_cpu_bf16_autocast_compiled(backend):
    check_autocast("cpu", backend, torch.bfloat16, compile_=True)


@cuda
@pytest.mark.parametrize("cast", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", backends_on("cuda") if torch.cuda.is_available() else [])
def test_cuda_autocast(backend, cast):
    check_autocast("cuda", backend, cast)
    assert expected_dtype(backend, "cuda", cast) == cast  # every CUDA backend runs half types


@cuda
@pytest.mark.parametrize("backend", backends_on("cuda") if torch.cuda.is_available() else [])
def test_cuda_autocast_compiled(backend):
    check_autocast("cuda", backend, torch.bfloat16, compile_=True)


def test_choice_of_dtype():
    table = {torch.bfloat16: ["reference"], torch.float32: ["cpu", "reference"]}
    assert run_dtype("auto", torch.bfloat16, table.get) == torch.float32
    assert run_dtype("reference", torch.bfloat16, table.get) == torch.bfloat16
    assert run_dtype("cpu", torch.bfloat16, table.get) == torch.float32
    gpu = {torch.float16: ["cuda", "triton", "reference"], torch.float32: ["cuda", "triton", "reference"]}
    assert run_dtype("auto", torch.float16, gpu.get) == run_dtype("triton", torch.float16, gpu.get) == torch.float16
    unbuilt = {torch.bfloat16: ["reference"], torch.float32: ["reference"]}
    assert run_dtype("auto", torch.bfloat16, unbuilt.get) == torch.bfloat16


@pytest.mark.skipif("cpu" not in ops.KERNEL_DEVICES, reason="daad_ext._C is not built")
def test_cpu_auto_runs_the_bf16_kernel():
    """Under bf16 autocast on CPU, "auto" runs the fused CPU kernel in bfloat16."""
    assert available_backends("cpu", torch.bfloat16)[0] == "cpu"
    assert run_dtype("auto", torch.bfloat16, lambda d: available_backends("cpu", d)) == torch.bfloat16
    x, memory = tie_free_inputs((2, 4, 4, 4), 12, DIVISION, margin=MARGIN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, w = block_memory(x, memory, DIVISION)
    assert y.dtype == w.dtype == torch.bfloat16
    y_cpu, w_cpu = block_memory(x.bfloat16(), memory.bfloat16(), DIVISION, backend="cpu")
    torch.testing.assert_close(y, y_cpu, rtol=0, atol=0)
    torch.testing.assert_close(w, w_cpu, rtol=0, atol=0)


def test_module_in_a_model_under_autocast():
    """The defect of issue 13: a conv before the layer yields bf16, the memory is float32."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                BlockMemory(8, 8, 8, num_items=12, division=DIVISION))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 8, 8))
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert model[1].memory.grad.abs().sum() > 0


def test_mismatched_dtypes_still_raise_outside_autocast():
    x, memory = torch.randn(2, 8, 8, 8, dtype=torch.bfloat16), torch.randn(12, 32)
    with pytest.raises(TypeError, match="same dtype"):
        block_memory(x, memory, DIVISION)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="same dtype"):
        block_memory(x.double(), memory, DIVISION)  # autocast leaves float64 alone, as for its own ops


def test_autocast_off_changes_nothing():
    x, memory = tie_free_inputs((2, 4, 4, 4), 12, DIVISION, margin=MARGIN)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        y, _ = block_memory(x, memory, DIVISION)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, block_memory(x, memory, DIVISION)[0], rtol=0, atol=0)


def test_triton_interpreter_under_autocast():
    """The Triton backend on CPU (interpreter, float32 only) runs in float32 under bf16 autocast."""
    pytest.importorskip("triton")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        from daad_ext import available_backends
        if "triton" not in available_backends("cpu", torch.float32):
            sys.exit(3)
        import test_amp
        test_amp.check_autocast("cpu", "triton", torch.bfloat16)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", DAAD_TRITON_AUTOTUNE="0")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip("the Triton backend is not available under the interpreter")
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.usefixtures("single_thread")
def test_trainer_bf16_step():
    from models.networks import ModelConfig
    from models.training import TrainConfig, Trainer

    config = TrainConfig(model=ModelConfig(model="daad+", size=32, width=4, division=(2, 2, 1), num_items=20))
    trainer = Trainer(config, torch.device("cpu"), amp=torch.bfloat16)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].dtype))
             for m in trainer.model.memories()]
    before = [m.memory.detach().clone() for m in trainer.model.memories()]
    losses = trainer.train_step(torch.rand(4, 3, 32, 32) * 2 - 1)
    for hook in hooks:
        hook.remove()
    assert seen == [torch.bfloat16] * 4  # the convolutions before each memory ran in bf16
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and set(losses) >= {"g", "d"}
    for m, old in zip(trainer.model.memories(), before):
        assert m.memory.dtype == torch.float32 and not torch.equal(m.memory, old)
    assert not trainer.amp.scaling  # bf16 needs no gradient scaling
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Trainer(config, torch.device("cpu"), amp=torch.float16)


@pytest.mark.usefixtures("single_thread")
def test_train_cli_amp(hazelnut, tmp_path):
    from models import train

    out = tmp_path / "run"
    trainer = train.main(["--dataset", "mvtec", "--root", str(hazelnut), "--size", "32", "--width", "4",
                          "--division", "2", "2", "1", "--num-items", "20", "--batch", "8",
                          "--device", "cpu", "--model", "daad", "--epochs", "1", "--amp", "--out", str(out)])
    assert trainer.amp.dtype == torch.bfloat16 and trainer.epoch == 1
    assert "amp" not in (out / "config.json").read_text()  # a flag of the invocation, not stored
