"""The files ``daad-predict`` (:mod:`models.predict`) writes for the predictions of a
:class:`~models.inference.Detector`, and what it reports of them.

For each image, in the output folder, by the image's file stem (prefixed by its folder's name
where two images share a stem):

* ``<stem>_heatmap.png``: the image and its normalised anomaly map over it (colour bar; 0.5 is the
  pixel threshold) with the contour of the predicted mask;
* with ``save_maps``, ``<stem>_map.npz`` (compressed: ``anomaly_map`` (H, W) normalised at the
  image's resolution, ``raw_map`` (S, S) the model's raw map, ``pred_mask`` (H, W) bool) and
  ``<stem>_mask.png``, the predicted mask (255: anomalous).
"""
from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..training.atomic import write_bytes, write_npz
from .inferencer import Prediction, Predictions
from .plots import save_heatmap


def output_stems(names: Sequence[str]) -> list[str]:
    """A distinct file stem per image name: its own, ``<folder>_<stem>`` where stems repeat, and a
    number after those that still do."""
    stems = [Path(n).stem for n in names]
    repeated = Counter(stems)
    stems = [s if repeated[s] == 1 else f"{Path(n).parent.name}_{s}" for n, s in zip(names, stems)]
    repeated, seen = Counter(stems), Counter()
    unique = []
    for stem in stems:
        seen[stem] += 1
        unique.append(stem if repeated[stem] == 1 else f"{stem}_{seen[stem]}")
    return unique


def save_prediction(prediction: Prediction, out: str, stem: str, save_maps: bool) -> dict[str, str]:
    """Writes the files of one prediction (see the module docstring); returns their paths by kind."""
    files = {"heatmap": os.path.join(out, f"{stem}_heatmap.png")}
    save_heatmap(prediction.image, None, prediction.anomaly_map, 1.0, files["heatmap"],
                 f"{Path(prediction.name).name}: {prediction.label}, score {prediction.pred_score:.3f}",
                 pred_mask=prediction.pred_mask)
    if save_maps:
        files["map"] = os.path.join(out, f"{stem}_map.npz")
        files["mask"] = os.path.join(out, f"{stem}_mask.png")
        write_npz(files["map"], anomaly_map=prediction.anomaly_map.astype(np.float32),
                  raw_map=prediction.raw_map, pred_mask=prediction.pred_mask)
        png = io.BytesIO()
        Image.fromarray(prediction.pred_mask.astype(np.uint8) * 255).save(png, format="PNG")
        write_bytes(files["mask"], png.getvalue())
    return files


def save_predictions(predictions: Predictions, out: str, save_maps: bool = False) -> list[dict[str, Any]]:
    """Writes every prediction's files to ``out``; returns a record per prediction: its ``image``
    name, ``score`` (``pred_score``), ``label`` (normal or anomalous) and file paths."""
    os.makedirs(out, exist_ok=True)
    return [{"image": p.name, "score": p.pred_score, "label": p.label, **save_prediction(p, out, stem, save_maps)}
            for p, stem in zip(predictions, output_stems([p.name for p in predictions]))]
