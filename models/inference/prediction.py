"""Scoring images one at a time with a trained detector and its stored calibration.

The Python API behind ``daad-predict`` (:mod:`models.predict`). A single image has no set to
min-max scale over, so R and L are scaled by their range on the training images (the
checkpoint's calibration, :meth:`~models.inference.Scorer.calibrate`): normal images score about
0..1, anomalies above. Heat maps share the colour scale of the training images' errors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..data import load_image
from .plots import save_heatmap
from .scorer import Scorer


@torch.no_grad()
def predict_images(model: nn.Module, scorer: Scorer, images: Sequence[str], out: str, device: torch.device,
                   channels: int, size: int) -> list[dict[str, Any]]:
    """The score of each image file (``scorer`` must hold a calibration), its raw R and L, and its
    heat map written to ``<out>/<stem>_heatmap.png``."""
    if scorer.calibration is None:
        raise ValueError("scoring single images needs the calibration of a finished training run")
    os.makedirs(out, exist_ok=True)
    results = []
    for path in images:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image not found: {path}")
        x = load_image(path, channels, size)
        s = model.score(x[None].to(device), scorer.ali_reduction, scorer.anomaly_map)
        maps = s.error_map.cpu().numpy()
        feat = s.feat.cpu().numpy() if s.feat is not None else None
        score = float(scorer.score(maps, feat)[0])
        heatmap = os.path.join(out, f"{Path(path).stem}_heatmap.png")
        save_heatmap(x, s.reconstruction[0], maps[0], scorer.calibration["map_max"], heatmap,
                     f"{Path(path).name}: score {score:.3f}")
        results.append({"image": path, "score": score, "rec": float(maps[0].mean(dtype="float64")),
                        "feat": None if feat is None else float(feat[0]), "heatmap": heatmap})
    return results
