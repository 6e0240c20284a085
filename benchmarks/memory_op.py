"""Benchmark of the block-wise memory operator: every backend, the reference under torch.compile, and
the matrix-multiply floor, at the four feature scales of DAAD (256x256 input, N=500, division 8x8x1).

    python benchmarks/memory_op.py                       # CPU, float32 and bfloat16, batch 8, all four scales
    python benchmarks/memory_op.py --device cuda --dtype bfloat16 --json out.json

Each backend also has a "frozen memory" row ("<backend>, frozen M"): the memory does not require
grad (a frozen memory at fine-tuning, or input gradients at inference), so the backward computes
grad x only; its forward equals the backend's.

``--also-dtype`` (default: bfloat16 for float32 on CPU) adds rows "<backend> (bfloat16)"
for the fused backends that run that dtype, and that dtype's floor, "floor (bfloat16)", on the
same values rounded to it, timed interleaved with the rest. Every row's ratios are to the floor of
its own dtype; a last table gives each fused backend's speed-up in that dtype over itself in
``--dtype``.

The floor is what no implementation can beat: the operator's two matrix products on contiguous
tensors, S = Q @ M^T (BQ x D x N) and Y = S @ M (BQ x N x D), with their backward (four more
products). Variants are timed interleaved (the order rotates every repeat), so machine noise hits
all of them alike; the table gives medians, the half inter-quartile range, and ratios to the floor.

Peak extra memory is what one forward+backward allocates beyond its inputs: on CUDA from
``torch.cuda.max_memory_allocated``; on CPU from the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs before each measurement), with glibc told to serve every block of
64 KiB or more by mmap, so that freed memory leaves the resident set at once and is not reused
unseen. That setting makes every large temporary a fresh mapping (page faults, zeroing), which
is not what a process pays once glibc reuses its freed blocks, so memory is measured after all
the timings (the times are printed as each scale finishes, the table with memory at the end);
each cell once, in this process, after its timed calls.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from daad_ext import available_backends, block_memory, block_memory_ref  # noqa: E402

#: Suffix of a variant whose memory is frozen (requires no grad): its backward computes grad x only.
FROZEN = ", frozen M"
#: DAAD's four memory scales at 256x256 input: (C, H, W) of the pooled encoder features.
SCALES = {1: (64, 128, 128), 2: (128, 64, 64), 3: (256, 32, 32), 4: (512, 16, 16)}


@dataclass
class Cell:
    scale: int
    variant: str
    dtype: str
    fwd_ms: float
    fwd_spread_ms: float
    fwdbwd_ms: float
    fwdbwd_spread_ms: float
    peak_mb: float
    fwd_ratio: float = float("nan")
    fwdbwd_ratio: float = float("nan")
    mem_ratio: float = float("nan")


class Problem:
    """Inputs of one scale, and a forward / forward+backward closure per variant."""

    def __init__(self, shape, batch, num_items, division, dtype, device, seed=0):
        c, h, w = shape
        self.division = division
        gen = torch.Generator().manual_seed(seed)
        d = (c // division[2]) * (h // division[0]) * (w // division[1])
        q = division[0] * division[1] * division[2]
        self.x = torch.randn(batch, c, h, w, generator=gen).to(device, dtype).requires_grad_()
        self.memory = (torch.rand(num_items, d, generator=gen) * 2 - 1).div(d ** 0.5)
        self.memory = self.memory.to(device, dtype).requires_grad_()
        self.grad_y = torch.randn(batch, c, h, w, generator=gen).to(device, dtype)
        # The floor's operands: contiguous queries and the weights' shape.
        self.queries = torch.randn(batch * q, d, generator=gen).to(device, dtype).requires_grad_()
        self.grad_floor = torch.randn(batch * q, d, generator=gen).to(device, dtype)

    def variant(self, name: str) -> tuple[Callable, Callable]:
        if name == "floor":
            def forward():
                return (self.queries @ self.memory.t()) @ self.memory
            grad = self.grad_floor
        else:
            frozen = name.endswith(FROZEN)
            read = self._read(name.removesuffix(FROZEN))
            memory = self.memory.detach() if frozen else self.memory

            def forward():
                return read(self.x, memory)
            grad = self.grad_y

        def forward_backward():
            out = forward()
            out.backward(grad)
            self.clear_grads()
        return forward, forward_backward

    def _read(self, name: str) -> Callable:
        if name == "reference+compile":
            division = self.division
            return torch.compile(lambda x, m: block_memory_ref(x, m, division)[0], dynamic=False)
        return lambda x, m: block_memory(x, m, self.division, backend=name)[0]

    def clear_grads(self) -> None:
        for t in (self.x, self.memory, self.queries):
            t.grad = None


class Clock:
    """Wall time of one call, synchronising the GPU around it."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self, fn: Callable) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3


class PeakMemory:
    """Peak bytes allocated by one call beyond what was allocated before it (see module docstring).
    On CPU, creating it fixes glibc's mmap threshold for the rest of the process: create it after
    the last timed call."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cpu":
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, no dynamic raising

    def __call__(self, fn: Callable) -> float:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        base = self._status_kb("VmRSS")
        fn()
        return (self._status_kb("VmHWM") - base) / 1024

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"{field} not in /proc/self/status")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Variant(NamedTuple):
    """A row of the table: ``name`` (a backend, "<backend>, frozen M", "reference+compile" or
    "floor") run in ``dtype``; ``label`` names it in the table."""
    dtype: torch.dtype
    name: str
    label: str


def variants_of(args) -> list[Variant]:
    """The table's rows: every variant in ``args.dtype``, then the fused backends and the floor in
    ``args.also_dtype``."""
    backends = args.backends or available_backends(args.device, args.dtype)
    frozen = [] if args.no_frozen else [name + FROZEN for name in backends]
    names = list(backends) + frozen + ([] if args.no_compile else ["reference+compile"]) + ["floor"]
    rows = [Variant(args.dtype, name, name) for name in names]
    if args.also_dtype is not None:
        also = [name for name in available_backends(args.device, args.also_dtype)
                if name != "reference" and (args.backends is None or name in args.backends)]
        rows += [Variant(args.also_dtype, name, f"{name} ({dtype_name(args.also_dtype)})")
                 for name in also + ["floor"]]
    return rows


def spread(samples: list[float]) -> float:
    """Half the inter-quartile range."""
    if len(samples) < 4:
        return (max(samples) - min(samples)) / 2
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return (q3 - q1) / 2


def closures_of(scale: int, args, variants: list[Variant]) -> "Closures":
    """Each variant's (forward, forward+backward) at ``scale``, on the same values per dtype."""
    problems = {dtype: Problem(SCALES[scale], args.batch, args.num_items, tuple(args.division),
                               dtype, args.device) for dtype in dict.fromkeys(v.dtype for v in variants)}
    return {v.label: problems[v.dtype].variant(v.name) for v in variants}


Closures = dict[str, tuple[Callable, Callable]]


def time_scale(scale: int, args, variants: list[Variant], clock: Clock) -> tuple[list[Cell], Closures]:
    """The cells of ``scale`` with their times and time ratios (peak memory not yet measured),
    and the calls timed."""
    closures = closures_of(scale, args, variants)
    for forward, forward_backward in closures.values():  # warm-up: compile, autotune, caches
        for _ in range(2):
            forward()
            forward_backward()
    labels = list(closures)
    times = {label: ([], []) for label in labels}
    for r in range(args.repeats):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for label in order:
            forward, forward_backward = closures[label]
            times[label][0].append(clock(forward))
            times[label][1].append(clock(forward_backward))
    cells = []
    for v in variants:
        fwd, fwdbwd = times[v.label]
        cells.append(Cell(scale, v.label, dtype_name(v.dtype), statistics.median(fwd), spread(fwd),
                          statistics.median(fwdbwd), spread(fwdbwd), float("nan")))
    for c, floor in zip(cells, floor_cells(variants, cells)):
        c.fwd_ratio = c.fwd_ms / floor.fwd_ms
        c.fwdbwd_ratio = c.fwdbwd_ms / floor.fwdbwd_ms
    return cells, closures


def floor_cells(variants: list[Variant], cells: list[Cell]) -> list[Cell]:
    """The floor cell of each cell's dtype (``cells`` are one scale's, in ``variants``' order)."""
    floors = {v.dtype: c for v, c in zip(variants, cells) if v.name == "floor"}
    return [floors[v.dtype] for v in variants]


def measure_memory(variants: list[Variant], closures: Closures, peak: PeakMemory, cells: list[Cell]) -> None:
    """Fills the peak memory of one scale's cells: one forward+backward of each (warm: timed before)."""
    for v, c in zip(variants, cells):
        c.peak_mb = peak(closures[v.label][1])
    for c, floor in zip(cells, floor_cells(variants, cells)):
        c.mem_ratio = c.peak_mb / floor.peak_mb


TABLE_HEAD = ("| scale | variant | fwd ms | fwd / floor | fwd+bwd ms | fwd+bwd / floor "
              "| peak MB | peak / floor |\n|" + "---|" * 8)


SPEEDUP_HEAD = ("| scale | backend | fwd speed-up | fwd+bwd speed-up |\n|" + "---|" * 4)


def speedup_rows(variants: list[Variant], cells: list[Cell]) -> str:
    """For each fused backend with rows in both dtypes: its time in the first dtype over its time
    in the second, per scale."""
    main = {v.name: v.label for v in variants if v.dtype == variants[0].dtype}
    pairs = [(main[v.name], v.label) for v in variants
             if v.dtype != variants[0].dtype and v.name != "floor" and v.name in main]
    by_label = {(c.scale, c.variant): c for c in cells}
    rows = []
    for scale in dict.fromkeys(c.scale for c in cells):
        for slow, fast in pairs:
            a, b = by_label[scale, slow], by_label[scale, fast]
            rows.append(f"| {scale} | {fast} over {slow} | {a.fwd_ms / b.fwd_ms:.2f}x "
                        f"| {a.fwdbwd_ms / b.fwdbwd_ms:.2f}x |")
    return "\n".join(rows)


def format_rows(cells: list[Cell]) -> str:
    rows = []
    for c in cells:
        c_, h, w = SCALES[c.scale]
        rows.append(f"| {c.scale} ({c_}x{h}x{w}) | {c.variant} | {c.fwd_ms:.2f} ± {c.fwd_spread_ms:.2f} "
                    f"| {c.fwd_ratio:.2f} | {c.fwdbwd_ms:.2f} ± {c.fwdbwd_spread_ms:.2f} "
                    f"| {c.fwdbwd_ratio:.2f} | {c.peak_mb:.1f} | {c.mem_ratio:.2f} |")
    return "\n".join(rows)


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file in the same folder and a rename, so
    that ``path`` holds either its old content or all of the new one."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".tmp-", delete=False) as f:
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            os.unlink(f.name)
            raise
    os.replace(f.name, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 3, 4], choices=sorted(SCALES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--num-items", type=int, default=500)
    parser.add_argument("--division", type=int, nargs=3, default=[8, 8, 1], metavar=("RH", "RW", "RC"))
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to time (default: every one available), besides "
                             "reference+compile and the floor")
    parser.add_argument("--no-compile", action="store_true", help="skip the reference under torch.compile")
    parser.add_argument("--no-frozen", action="store_true",
                        help="skip the frozen-memory rows (memory without grad: grad x only)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--also-dtype", default=None, choices=["bfloat16", "float16", "none"],
                        help="also time the fused backends and the floor in this dtype "
                             "(default: bfloat16 for float32 on CPU, else none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 on CPU, 30 on CUDA")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--json", default=None, metavar="PATH", help="also save the table as JSON")
    args = parser.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.device = torch.device(args.device)
    if args.also_dtype is None:
        cpu_float32 = args.device.type == "cpu" and args.dtype == torch.float32
        args.also_dtype = "bfloat16" if cpu_float32 else "none"
    args.also_dtype = None if args.also_dtype == "none" else getattr(torch, args.also_dtype)
    if args.repeats is None:
        args.repeats = 30 if args.device.type == "cuda" else 7
    return args


def main(argv=None) -> list[Cell]:
    args = parse_args(argv)
    variants = variants_of(args)
    clock = Clock(args.device)
    device_name = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                   else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    also = f" (and {args.also_dtype})" if args.also_dtype else ""
    print(f"block memory benchmark: {device_name}, {args.dtype}{also}, batch {args.batch}, "
          f"N={args.num_items}, division {tuple(args.division)}, {args.repeats} repeats, torch "
          f"{torch.__version__}", flush=True)
    timed = []
    print(TABLE_HEAD, flush=True)
    for scale in args.scales:  # rows as each scale finishes, so a cut-off run still reports its times
        timed.append(time_scale(scale, args, variants, clock))
        print(format_rows(timed[-1][0]), flush=True)
    cells = [c for scale_cells, _ in timed for c in scale_cells]
    if not args.no_memory:  # after every timed call: see PeakMemory
        peak = PeakMemory(args.device)
        for scale_cells, closures in timed:
            measure_memory(variants, closures, peak, scale_cells)
        print("\nwith the peak memory of one forward+backward:\n" + TABLE_HEAD + "\n" + format_rows(cells), flush=True)
    if any(v.dtype != args.dtype for v in variants):
        print("\n" + SPEEDUP_HEAD + "\n" + speedup_rows(variants, cells), flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps({
            "device": device_name, "dtype": str(args.dtype),
            "also_dtype": str(args.also_dtype) if args.also_dtype else None, "batch": args.batch,
            "num_items": args.num_items, "division": args.division, "repeats": args.repeats,
            "torch": torch.__version__, "cells": [asdict(c) for c in cells]}, indent=2))
    return cells


if __name__ == "__main__":
    main()
