"""The full detector at the paper's setting: inference (the predict path) and one training step.

    python benchmarks/detector.py                       # DAAD+, 256x256, width 64, 8x8x1, N=500, batch 8
    python benchmarks/detector.py --size 64 --width 16 --repeats 5      # a quick look

Inference is the graph ``models.export`` writes (generator, discriminator features, anomaly map
and calibrated score) in eval mode, images per second, with the memories on the reference
backend, on the fused one, the whole graph under ``torch.compile``, in ONNX Runtime, and under
bfloat16 autocast (on CPU the fused kernel is float32-only and runs in float32 there; the reference
runs in bf16). One training step is the generator step and the discriminator step of
``models.trainer``, with Adam. Variants run interleaved, ``--repeats`` times each after a warm-up;
the table gives medians. The breakdown times the modules of one eager forward with hooks
(memories, discriminator; the rest is the convolutions and the scoring), and "saved" is the size
of the tensors a training forward saves for the backward (peak GPU memory on CUDA).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models.config import ModelConfig, TrainConfig  # noqa: E402
from models.export import OPSET, ScoringGraph  # noqa: E402
from models.trainer import Trainer  # noqa: E402

CALIBRATION = {"rec_min": 0.0, "rec_max": 1.0, "feat_min": 0.0, "feat_max": 1.0, "map_max": 1.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for memory in model.memories():
        memory.backend = backend


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def breakdown(graph: ScoringGraph, x: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Seconds in the memories, the discriminator and the rest of one eager forward."""
    spent = {"memories": 0.0, "discriminator": 0.0}
    handles = []
    for name, modules in (("memories", graph.model.memories()),
                          ("discriminator", [graph.model.discriminator] if graph.model.discriminator else [])):
        for module in modules:
            def pre(_m, _a, name=name):
                sync(device)
                spent[f"_{name}"] = time.perf_counter()

            def post(_m, _a, _o, name=name):
                sync(device)
                spent[name] += time.perf_counter() - spent.pop(f"_{name}")
            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    with torch.no_grad():
        total = timed(lambda: graph(x), device)
    for h in handles:
        h.remove()
    return {"convs+scoring": total - spent["memories"] - spent["discriminator"], **spent}


def onnx_session(graph: ScoringGraph, x: torch.Tensor):
    import onnxruntime as ort

    from daad_ext.export import decompose

    with torch.no_grad():
        program = decompose(torch.export.export(graph, (x,), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}}))
    onnx_program = torch.onnx.export(program, (x,), input_names=["image"], opset_version=OPSET,
                                     dynamo=True, verbose=False)
    path = os.path.join(tempfile.mkdtemp(), "detector.onnx")
    onnx_program.save(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"image": x.cpu().numpy()}
    return lambda: session.run(None, feed)


def run_interleaved(variants: dict[str, Callable[[], object]], repeats: int,
                    device: torch.device) -> dict[str, float]:
    for name, fn in variants.items():  # warm-up (and compilation)
        start = time.perf_counter()
        fn()
        print(f"  warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="daad+")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--division", type=int, nargs=3, default=(8, 8, 1))
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out (e.g. compiled onnxruntime)")
    p.add_argument("--compile-train", action="store_true",
                   help="also time the training step with the generator and discriminator compiled "
                        "(minutes of compilation on a CPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    fused = "cuda" if device.type == "cuda" else "cpu"
    config = TrainConfig(model=ModelConfig(model=args.model, size=args.size, width=args.width,
                                           division=tuple(args.division), num_items=args.num_items))
    trainer = Trainer(config, device)
    graph = ScoringGraph(trainer.model, config.fusion_gamma, CALIBRATION, config.ali_loss).eval()
    x = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    half = torch.bfloat16

    def infer(backend: str, autocast: bool = False, fn: Callable = graph) -> Callable[[], object]:
        def run():
            set_backend(trainer.model, backend)
            with torch.no_grad(), (torch.autocast(device.type, dtype=half) if autocast else nullcontext()):
                return fn(x)
        return run

    print(f"{args.model}, {args.size}x{args.size}, width {args.width}, division {tuple(args.division)}, "
          f"N={args.num_items}, batch {args.batch}, {device}, {torch.get_num_threads()} threads", flush=True)
    inference = {"reference": infer("reference"), fused: infer(fused),
                 "compiled": infer(fused, fn=torch.compile(graph)),
                 f"bf16 autocast, {fused}": infer(fused, autocast=True),
                 "bf16 autocast, reference": infer("reference", autocast=True)}
    if device.type == "cpu" and "onnxruntime" not in args.skip:
        set_backend(trainer.model, fused)
        inference["onnxruntime"] = onnx_session(graph, x)
    inference = {k: v for k, v in inference.items() if k not in args.skip}
    seconds = run_interleaved(inference, args.repeats, device)
    print(f"\ninference (predict path), median of {args.repeats}:")
    print(f"  {'variant':28s} {'s/batch':>8s} {'images/s':>9s} {'vs reference':>12s}")
    for name, s in seconds.items():
        print(f"  {name:28s} {s:8.3f} {args.batch / s:9.2f} {seconds['reference'] / s:11.2f}x")

    print("\nbreakdown of one eager forward (s):")
    for backend in ("reference", fused):
        set_backend(trainer.model, backend)
        parts = breakdown(graph, x, device)
        print(f"  {backend:10s} " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))

    eager = (trainer.generator, trainer.discriminator)
    compiled = (torch.compile(trainer.generator), torch.compile(trainer.discriminator))

    def step(backend: str, networks: tuple = eager) -> Callable[[], object]:
        def run():
            set_backend(trainer.model, backend)
            trainer.generator, trainer.discriminator = networks
            return trainer.train_step(x)
        return run

    training = {"reference": step("reference"), fused: step(fused)}
    if args.compile_train:
        training["compiled"] = step(fused, compiled)
    seconds = run_interleaved(training, args.repeats, device)
    print(f"\ntraining step (G + D, Adam), median of {args.repeats}:")
    for name, s in seconds.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            training[name]()
            memory = f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        elif name == "compiled":  # compiled graphs save their tensors outside autograd's hooks
            memory = ""
        else:
            set_backend(trainer.model, name)
            trainer.generator = eager[0]
            memory = f"saved {saved_bytes(lambda: trainer.generator(x)) / 2**20:.0f} MiB (generator)"
        print(f"  {name:10s} {s:8.3f} s/step  {args.batch / s:6.2f} images/s  "
              f"{seconds['reference'] / s:5.2f}x  {memory}")


if __name__ == "__main__":
    main()
