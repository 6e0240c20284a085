"""Time of one training step (forward, backward, Adam step) of a small autoencoder with block-wise
memories at three scales, with the reference backend and with the fused one, interleaved.

    python benchmarks/train_step.py                        # 64x64 input, batch 8, CPU
    python benchmarks/train_step.py --size 128 --batch 4 --backends reference cpu --steps 10

The model: a strided conv encoder (3 -> w -> 2w -> 4w channels at 1/2, 1/4, 1/8 of the input),
a ``BlockMemory`` on each of the three feature maps (division 8x8x1, N items), and a transposed
conv decoder that sums the memory read-outs in as skip connections; the loss is the
reconstruction MSE plus MemAE's entropy of the addressing weights. Both backends start from the
same weights; steps alternate between them, and the table gives the median time per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from daad_ext import BlockMemory, available_backends  # noqa: E402


class MemoryAutoencoder(nn.Module):
    def __init__(self, size: int, width: int, num_items: int, backend: str):
        super().__init__()
        chans = [width, 2 * width, 4 * width]
        self.encoder = nn.ModuleList()
        self.memories = nn.ModuleList()
        c_in = 3
        for level, c in enumerate(chans):
            side = size // 2 ** (level + 1)
            self.encoder.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1),
                                              nn.BatchNorm2d(c), nn.ReLU()))
            self.memories.append(BlockMemory(c, side, side, num_items=num_items, division=(8, 8, 1),
                                             backend=backend))
            c_in = c
        self.decoder = nn.ModuleList()
        for c_out, c in zip([chans[1], chans[0], 3], reversed(chans)):
            self.decoder.append(nn.ConvTranspose2d(c, c_out, 4, stride=2, padding=1))

    def forward(self, x):
        feats, weights = [], []
        for encode, memory in zip(self.encoder, self.memories):
            x = encode(x)
            y, w = memory(x, return_weights=True)
            feats.append(y)
            weights.append(w)
        h = feats[-1]
        for i, decode in enumerate(self.decoder):
            h = decode(h)
            if i < 2:
                h = torch.relu(h + feats[-2 - i])
        return h, weights


def loss_fn(model, images):
    out, weights = model(images)
    entropy = sum(-(w * (w + 1e-12).log()).sum(-1).mean() for w in weights)
    return nn.functional.mse_loss(out, images) + 2e-4 * entropy


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="input side (divisible by 64)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=32, help="channels of the first encoder level")
    parser.add_argument("--num-items", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per backend")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=None,
                        help="default: reference and every fused backend available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.size % 64:
        parser.error("--size must be divisible by 64 (three halvings, then 8x8 blocks)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    backends = args.backends or ["reference"] + [
        b for b in available_backends(device, dtype) if b != "reference"]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device, dtype=dtype)
    base = MemoryAutoencoder(args.size, args.width, args.num_items, "reference").to(device, dtype)
    runs = {}
    for name in backends:
        model = MemoryAutoencoder(args.size, args.width, args.num_items, name).to(device, dtype)
        model.load_state_dict(base.state_dict())
        runs[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-3), [])

    def step(name):
        model, optimizer, _ = runs[name]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, images)
        loss.backward()
        optimizer.step()
        return loss.item()

    print(f"train step: {args.size}x{args.size} input, batch {args.batch}, width {args.width}, "
          f"N={args.num_items}, {dtype}, {device}, {torch.get_num_threads()} threads, "
          f"backends {backends}", flush=True)
    first_losses = {name: step(name) for name in backends}  # also the first warm-up step
    for _ in range(args.warmup - 1):
        for name in backends:
            step(name)
    for r in range(args.steps):
        for name in backends[r % len(backends):] + backends[:r % len(backends)]:
            sync()
            start = time.perf_counter()
            step(name)
            sync()
            runs[name][2].append((time.perf_counter() - start) * 1e3)
    ref = statistics.median(runs[backends[0]][2])
    print("| backend | step ms (median) | min | speed-up vs " + backends[0] + " | first loss |")
    print("|---|---|---|---|---|")
    result = {}
    for name in backends:
        times = runs[name][2]
        med = statistics.median(times)
        result[name] = med
        print(f"| {name} | {med:.1f} | {min(times):.1f} | {ref / med:.2f}x | "
              f"{first_losses[name]:.6f} |")
    return result


if __name__ == "__main__":
    main()
