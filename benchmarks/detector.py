"""The whole detector against the machine's limit: inference (the predict path) and one training step.

    python benchmarks/detector.py                                # both sizes, every variant (~14 min on the 2 quiet cores)
    python benchmarks/detector.py --sizes study --repeats 5      # the study's setting only (~2 min)

Two sizes, batch 8, DAAD+ with N = 500: ``paper`` (256x256, width 64, division 8x8x1) and
``study`` (64x64, width 16, division 2x2x1, the reproduction study's). Inference is the graph
``models.export`` writes (generator, discriminator features, anomaly map and calibrated score), in
eval mode, for each :class:`models.networks.acceleration.SpeedOptions` variant, on the reference memories,
and the graph exported by ``models.export`` in ONNX Runtime (float32) and OpenVINO (float32, and
bfloat16 where the CPU has it), through :func:`models.inference.runtimes.load_runtime`. Its input
is a batch of uint8 images at the model's size (the graph's resize is then the identity, as two
small matrix products). One training step is ``Trainer.train_step`` (generator step and
discriminator step, Adam), each variant with its own trainer, on the same images prepared.

Every row is reported as images per second, achieved GFLOP/s and the fraction of the peak of its
dtype. The peaks are a 2048 x 2048 matrix product in float32 and in bfloat16, run as two more
variants in the same interleaved rounds; the fastest of their calls is the peak (what the cores
do when this process has them). "vs base" is the median over rounds of the baseline's time
over the variant's in the same round. ``keep_freed_memory`` is process-wide, so the variants with
it run in a second process (spawned, waiting its turn on a pipe) and the rest keep glibc's malloc
as every process has it; that process hands its free memory back after each call
(``malloc_trim``), so that the other rows do not run beside the gigabytes it keeps.
FLOPs are counted once per size with ``torch.utils.flop_counter.FlopCounterMode`` on the baseline
(eager float32, fused memories) and are the same for every variant: each does the same work. The
fused memory op has no formula of its own; the two matrix products of its forward (similarity and
read, 2 B Q N D each, Q D = C H W) and their gradients are registered below, the count the
reference's batched products give.

Variants run interleaved, ``--repeats`` times each after one warm-up call, each timed call right
after an untimed one of the same variant (:func:`steady`); the tables give medians. The warm-up
of a compiled variant includes its compilation: "compile" is the warm-up less the median, and
"pays after" the number of batches whose saved time repays it against the same variant
uncompiled. The raw results go to ``--json`` (default
benchmarks/results/detector-<date>.json).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from models import AnomalyDetector, ModelConfig, Scorer, TrainConfig, Trainer, build_dataset  # noqa: E402
from models.networks.acceleration import (FAST_INFERENCE, FAST_TRAINING, SpeedOptions, autocast_dtype,  # noqa: E402
                                          inference_context, inference_model, keep_freed_memory)
from models.data.preprocess import to_model_input  # noqa: E402
from models.inference.graph import ScoringGraph, export_graph  # noqa: E402
from models.inference.runtimes import load_runtime  # noqa: E402

import daad_ext  # noqa: E402,F401  (registers torch.ops.daad_ext)

CALIBRATION = {"rec_min": 0.0, "rec_max": 1.0, "max_min": 0.0, "max_max": 1.0, "feat_min": 0.0, "feat_max": 1.0,
               "map_max": 1.0}
SIZES = {"paper": dict(size=256, width=64, division=(8, 8, 1)),
         "study": dict(size=64, width=16, division=(2, 2, 1))}
#: Interleaved rounds at each size (--repeats overrides): a paper-size eager batch takes ~20 s.
REPEATS = {"paper": 3, "study": 10}
BASELINE = "fused, eager fp32"
#: name: (memory backend, options). "auto" is the fused kernel of the device.
INFERENCE = {
    "reference memories": ("reference", SpeedOptions()),
    BASELINE: ("auto", SpeedOptions()),
    "fused, eager fp32, kept memory": ("auto", SpeedOptions(keep_freed_memory=True)),
    "channels_last": ("auto", SpeedOptions(channels_last=True)),
    "channels_last + folded BN": ("auto", SpeedOptions(channels_last=True, fold_batchnorm=True)),
    "bf16 autocast": ("auto", SpeedOptions(bf16=True)),
    "cl + fold + bf16": ("auto", replace(FAST_INFERENCE, keep_freed_memory=False)),
    "fast (cl + fold + bf16 + kept memory)": ("auto", FAST_INFERENCE),
    "fast + compile": ("auto", replace(FAST_INFERENCE, compile=True)),
}
TRAINING = {
    "reference memories": ("reference", SpeedOptions()),
    BASELINE: ("auto", SpeedOptions()),
    "fused, eager fp32, kept memory": ("auto", SpeedOptions(keep_freed_memory=True)),
    "channels_last": ("auto", SpeedOptions(channels_last=True)),
    "cl + fused Adam": ("auto", replace(FAST_TRAINING, keep_freed_memory=False)),
    "fast (cl + fused Adam + kept memory)": ("auto", FAST_TRAINING),
    "fast + bf16 autocast": ("auto", replace(FAST_TRAINING, bf16=True)),
    "fast + compiled G and D": ("auto", replace(FAST_TRAINING, compile=True)),
}
PEAK_SIDE = 2048
#: Seconds between two timed calls, longer than libgomp's threads spin after their work.
SETTLE_S = 0.05


def block_memory_products(x, memory) -> int:
    """B Q N D of a block-memory call: the multiply-adds of one of its matrix products."""
    b, c, h, w = x
    return b * c * h * w * memory[0]


@register_flop_formula(torch.ops.daad_ext.block_memory_forward)
def block_memory_forward_flops(x, memory, *_args, out_shape=None, **_kwargs) -> int:
    return 2 * 2 * block_memory_products(x, memory)  # similarity and read


@register_flop_formula(torch.ops.daad_ext.block_memory_backward)
def block_memory_backward_flops(_grad_y, _grad_w, x, memory, *args, out_shape=None, **_kwargs) -> int:
    needs_grad_x, needs_grad_memory = args[-2:]
    # grad of the weights (read), of the queries (similarity), of the memory (read and similarity)
    return 2 * block_memory_products(x, memory) * (1 + needs_grad_x + 2 * needs_grad_memory)


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """``fn`` returning its wall time in seconds."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def steady(fn: Callable[[], float]) -> Callable[[], float]:
    """``fn`` with each call after the first preceded by an untimed one, so that the timed call
    finds memory as a run of batches of the same variant leaves it, whatever ran before (the other
    process's freed gigabytes included). The paper-size rows on glibc's defaults still vary more
    from round to round than the others (README, "The detector")."""
    calls = 0

    def run() -> float:
        nonlocal calls
        if calls:
            fn()
        calls += 1
        return fn()
    return run


def peak_matmul(dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    a = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    b = torch.randn(PEAK_SIDE, PEAK_SIDE).to(dtype)
    return timed(lambda: torch.mm(a, b))


PEAK_FLOPS = 2 * PEAK_SIDE ** 3
PEAKS = {"peak matmul fp32": peak_matmul(torch.float32), "peak matmul bf16": peak_matmul(torch.bfloat16)}


def run_interleaved(variants: dict[str, Callable[[], float]], repeats: int,
                    counted: str) -> tuple[dict[str, list[float]], dict[str, float], FlopCounterMode]:
    """Times of ``repeats`` interleaved rounds of the timed callables after one warm-up call each
    (``counted``'s under a FLOP counter); returns the times, the warm-up seconds and the counter.
    Each call starts after a pause of :data:`SETTLE_S`: OpenMP's threads spin for a while after
    their work, and a call in the other process (:class:`KeptMemoryProcess`) would share the
    cores with them."""
    counter = FlopCounterMode(display=False)
    warmup = {}
    for name, fn in variants.items():
        time.sleep(SETTLE_S)
        if name == counted:
            with counter:
                warmup[name] = fn()
        else:
            warmup[name] = fn()
        print(f"  warm-up {name}: {warmup[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            time.sleep(SETTLE_S)
            times[name].append(fn())
    return times, warmup, counter


class KeptMemoryProcess:
    """The variants whose options keep freed memory, in a spawned process of their own:
    :func:`keep_freed_memory` is process-wide, and the other rows must run on glibc's malloc as a
    process that never changed it does (its thresholds adapt as it runs). One call at a time (the
    caller waits on the pipe), each timed where it runs, then ``malloc_trim``: while this process
    held the kept memory of a paper-size training step (about 5 GB), the other's page faults took
    about three times the kernel time (its training rows ran at 25 s a step instead of 14)."""

    def __init__(self, kind: str, size: str, args: argparse.Namespace, device: torch.device) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=serve_kept_memory, args=(child, kind, size, args, str(device)),
                                       daemon=True)
        self.process.start()
        self.dtypes: dict[str, str] = self.receive()

    def receive(self):
        result = self.connection.recv()
        if isinstance(result, BaseException):
            raise RuntimeError("the kept-memory process failed") from result
        return result

    def variant(self, name: str) -> Callable[[], float]:
        def run() -> float:
            self.connection.send(name)
            return self.receive()
        return run

    def __enter__(self) -> "KeptMemoryProcess":
        return self

    def __exit__(self, *_exc) -> None:
        self.connection.send(None)
        self.process.join()


def serve_kept_memory(connection, kind: str, size: str, args: argparse.Namespace, device: str) -> None:
    """The loop of :class:`KeptMemoryProcess`: builds the kept-memory variants, sends their
    dtypes, then runs each name received, hands the free memory back and sends the seconds,
    until None."""
    try:
        if not keep_freed_memory():
            raise RuntimeError("keep_freed_memory needs glibc's malloc; run with --skip for its rows")
        malloc_trim = ctypes.CDLL(None).malloc_trim
        variants, dtypes = variants_of(kind, size, args, torch.device(device), kept=True)
        connection.send(dtypes)
        while (name := connection.recv()) is not None:
            seconds = variants[name]()
            malloc_trim(0)
            connection.send(seconds)
    except Exception as error:  # noqa: BLE001  (reported by the caller)
        connection.send(error)


def detector(config: TrainConfig, backend: str, state: dict) -> AnomalyDetector:
    """A fresh detector with ``state``'s weights on ``backend`` (a BlockMemory resolves its backend
    at its first call and keeps it, so every backend gets its own networks)."""
    model = AnomalyDetector(replace(config.model, backend=backend))
    model.load_state_dict(state)
    return model


def inference_variants(config: TrainConfig, state: dict, images: torch.Tensor, skip: set[str], kept: bool
                       ) -> tuple[dict[str, Callable[[], float]], dict[str, str]]:
    """The timed inference callables on uint8 ``images`` (B, S, S, C) whose options keep freed
    memory or not (``kept``; the runtimes' rows with those that do not), and their dtypes."""
    scorer = Scorer.for_run(config, calibration=CALIBRATION)  # predict's default image score
    variants, dtypes = {}, {}
    for name, (backend, options) in INFERENCE.items():
        if name in skip or options.keep_freed_memory != kept:
            continue
        graph = ScoringGraph(inference_model(detector(config, backend, state), options), scorer)

        def run(graph=graph, options=options):
            with inference_context(options, images.device):
                return graph(images)
        variants[name] = timed(run)
        dtypes[name] = "bf16" if autocast_dtype(options, images.device) else "fp32"
    if images.device.type == "cpu" and not kept:
        graph = ScoringGraph(detector(config, "auto", state), scorer)
        for name, (run, dtype) in exported_runtimes(graph, images, skip).items():
            variants[name], dtypes[name] = run, dtype
    return variants, dtypes


def exported_runtimes(graph: ScoringGraph, images: torch.Tensor, skip: set[str]
                      ) -> dict[str, tuple[Callable[[], float], str]]:
    """The rows of the graph ``models.export`` writes (memories in standard operators) in the
    runtimes of :mod:`models.inference.runtimes`, on this process's thread count: name ->
    (callable, dtype). bf16 in OpenVINO only where the CPU has it."""
    import openvino

    rows = {"onnxruntime": ("onnx", "fp32"), "openvino": ("openvino", "fp32")}
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        rows["openvino bf16"] = ("openvino", "bf16")
    batch, folders, runs = images.numpy(), {}, {}
    for name, (fmt, precision) in rows.items():
        if name in skip:
            continue
        if fmt not in folders:
            folders[fmt] = os.path.join(tempfile.mkdtemp(), fmt)
            export_graph(graph, fmt, folders[fmt], {})
        runtime = load_runtime(folders[fmt], precision, threads=torch.get_num_threads())
        runs[name] = timed(lambda runtime=runtime: runtime.run(batch)), precision
    return runs


def training_variants(config: TrainConfig, x: torch.Tensor, skip: set[str], kept: bool
                      ) -> tuple[dict[str, Callable[[], float]], dict[str, str]]:
    """One timed trainer per variant whose options keep freed memory or not (``kept``), each from
    the same seed (so the same initial weights)."""
    variants, dtypes = {}, {}
    for name, (backend, options) in TRAINING.items():
        if name in skip or options.keep_freed_memory != kept:
            continue
        amp = autocast_dtype(options, x.device)
        trainer = Trainer(replace(config, model=replace(config.model, backend=backend)), x.device, amp=amp,
                          speed=options)
        variants[name] = timed(lambda trainer=trainer: trainer.train_step(x))
        dtypes[name] = "bf16" if amp else "fp32"
    return variants, dtypes


def table(kind: str, variants: dict[str, Callable[[], float]], dtypes: dict[str, str], repeats: int,
          batch: int, uncompiled: dict[str, str]) -> dict:
    """Runs the variants and the peaks interleaved; prints and returns the rows."""
    times, warmup, counter = run_interleaved({**variants, **PEAKS}, repeats, BASELINE)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    # The peak is what the cores do when this process gets them: the fastest product of the run.
    peak = {dtype: PEAK_FLOPS / min(times[f"peak matmul {dtype}"]) / 1e9 for dtype in ("fp32", "bf16")}
    flops = counter.get_total_flops()
    # Forward FLOPs by network ("Generator" in a training step, "ScoringGraph.model.generator" in
    # the graph); the backward's are counted in the total only.
    modules = {name.rsplit(".", 1)[-1].lower(): sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if name.rsplit(".", 1)[-1].lower() in ("generator", "discriminator")}
    print(f"\n{kind}, batch {batch}, median of {repeats}: {flops / batch / 1e9:.2f} GFLOP an image; "
          f"peak {peak['fp32']:.1f} GFLOP/s fp32, {peak['bf16']:.1f} bf16")
    print(f"  {'variant':28s} {'dtype':5s} {'s/batch':>8s} {'images/s':>9s} {'GFLOP/s':>8s} "
          f"{'of peak':>8s} {'vs base':>8s} {'compile s':>9s} {'pays after':>10s}")
    rows = []
    for name, dtype in dtypes.items():
        s = seconds[name]
        row = {"variant": name, "dtype": dtype, "seconds": s, "times": times[name], "warmup_s": warmup[name],
               "images_per_s": batch / s, "gflops": flops / s / 1e9, "fraction_of_peak": flops / s / 1e9 / peak[dtype],
               # The median of each round's ratio: a round's variants share its load.
               "vs_baseline": statistics.median(b / t for b, t in zip(times[BASELINE], times[name]))}
        base = uncompiled.get(name)
        if base in seconds:
            row["compile_s"] = warmup[name] - s
            saved = seconds[base] - s
            row["pays_after_batches"] = row["compile_s"] / saved if saved > 0 else None
        rows.append(row)
        compile_s, pays = row.get("compile_s"), row.get("pays_after_batches")
        print(f"  {name:28s} {dtype:5s} {s:8.3f} {row['images_per_s']:9.2f} {row['gflops']:8.1f} "
              f"{row['fraction_of_peak']:8.1%} {row['vs_baseline']:7.2f}x "
              f"{'' if compile_s is None else f'{compile_s:.1f}':>9s} {'' if pays is None else f'{pays:.0f}':>10s}",
              flush=True)
    return {"flops_per_batch": flops, "module_forward_flops": modules, "peak_gflops": peak,
            "peak_times": {d: times[f"peak matmul {d}"] for d in peak}, "rows": rows}


def uncompiled_names(variants: dict[str, tuple[str, SpeedOptions]]) -> dict[str, str]:
    """Each compiled variant's name -> the name of the same options uncompiled (if listed)."""
    by_options = {(backend, options): name for name, (backend, options) in variants.items()}
    return {name: by_options.get((backend, replace(options, compile=False)))
            for name, (backend, options) in variants.items() if options.compile}


def loading_rate(root: str, size: int, batch: int) -> dict:
    """Images per second of a first pass over the MVTec test split under ``root`` (decoding and
    resizing; later passes hit the dataset's cache), batched as ``models.inference`` loads it."""
    dataset = build_dataset("mvtec", root, "test", size)
    start = time.perf_counter()
    for _ in torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False):
        pass
    seconds = time.perf_counter() - start
    print(f"data loading, first pass of {len(dataset)} test images at {size}x{size}: "
          f"{len(dataset) / seconds:.1f} images/s", flush=True)
    return {"root": root, "images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / seconds}


def skipped(size: str, args: argparse.Namespace) -> set[str]:
    return set(args.skip) | set(args.skip_paper if size == "paper" else [])


def variants_of(kind: str, size: str, args: argparse.Namespace, device: torch.device, kept: bool
                ) -> tuple[dict[str, Callable[[], float]], dict[str, str]]:
    """The timed variants of ``kind`` ("inference" or "training") at ``size`` whose options keep
    freed memory or not (``kept``), and their dtypes; every process draws the same weights and
    images (seed 0)."""
    settings = SIZES[size]
    config = TrainConfig(model=ModelConfig(model=args.model, num_items=args.num_items, **settings))
    torch.manual_seed(0)
    state = {k: v.to(device) for k, v in AnomalyDetector(config.model).state_dict().items()}
    images = torch.randint(0, 256, (args.batch, settings["size"], settings["size"], 3), dtype=torch.uint8,
                           device=device)
    if kind == "inference":
        variants, dtypes = inference_variants(config, state, images, skipped(size, args), kept)
    else:
        x = to_model_input(images.permute(0, 3, 1, 2), settings["size"])
        variants, dtypes = training_variants(config, x, skipped(size, args), kept)
    return {name: steady(fn) for name, fn in variants.items()}, dtypes


def run_size(size: str, args: argparse.Namespace, device: torch.device) -> dict:
    settings = SIZES[size]
    print(f"\n== {size}: {args.model}, {settings}, N={args.num_items}, batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} threads; skipping {sorted(skipped(size, args)) or 'nothing'}", flush=True)
    result = {"settings": {**settings, "model": args.model, "num_items": args.num_items, "batch": args.batch}}
    if args.data and os.path.isdir(args.data):
        result["data_loading"] = loading_rate(args.data, settings["size"], args.batch)
    repeats = args.repeats or REPEATS[size]
    for kind, title, listed in (("inference", "inference", INFERENCE), ("training", "training step", TRAINING)):
        variants, dtypes = variants_of(kind, size, args, device, kept=False)
        with KeptMemoryProcess(kind, size, args, device) as kept:
            variants.update({name: kept.variant(name) for name in kept.dtypes})
            dtypes.update(kept.dtypes)
            order = [*listed, *dtypes]  # the listed order, then the runtimes
            dtypes = {name: dtypes[name] for name in sorted(dtypes, key=order.index)}
            result[kind] = table(title, {name: variants[name] for name in dtypes}, dtypes, repeats, args.batch,
                                 uncompiled_names(listed))
        del variants
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    p.add_argument("--model", default="daad+")
    p.add_argument("--num-items", type=int, default=500)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, help=f"interleaved rounds (default: {REPEATS})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip", nargs="*", default=["fast + compiled G and D"],
                   help="variants to leave out at every size (default: %(default)s, minutes of compilation "
                        "that did not pay at the study's size; --skip with no names runs everything)")
    p.add_argument("--skip-paper", nargs="*", default=["reference memories", "channels_last"],
                   help="variants to leave out at the paper's size (slow ones that decide nothing; "
                        "default: %(default)s)")
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                                  "shared", "data", "mvtec_hazelnut_subset"),
                   help="an MVTec category whose test split times data loading (default: the hazelnut "
                        "subset beside the checkout; skipped where absent)")
    p.add_argument("--json", help="where to write the raw results (default: benchmarks/results/detector-DATE.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    machine = {"started": start, "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "load_average_start": os.getloadavg(), "device": str(device),
               "command": " ".join(sys.argv), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
               "libc": " ".join(platform.libc_ver())}
    results = {name: run_size(name, args, device) for name in args.sizes}
    machine["load_average_end"] = os.getloadavg()
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"detector-{start[:10]}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    options = {kind: {name: [backend, asdict(o)] for name, (backend, o) in variants.items()}
               for kind, variants in (("inference", INFERENCE), ("training", TRAINING))}
    with open(path, "w") as f:
        json.dump({"machine": machine, "variants": options, "sizes": results}, f, indent=1)
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
