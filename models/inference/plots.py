"""Figures: the ROC curve and anomaly heat-map overlays (matplotlib, headless Agg backend).

The study's figures (:mod:`models.study.figures`) draw with the same ``plt`` and :func:`save_figure`.

Example:
    >>> import numpy as np, os, tempfile
    >>> from models.inference.plots import save_roc
    >>> path = os.path.join(tempfile.mkdtemp(), "roc.png")
    >>> save_roc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]), path, "demo")
"""
from __future__ import annotations

import io
import os
from typing import Optional, Union

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from ..training.atomic import write_bytes  # noqa: E402
from .metrics import image_roc  # noqa: E402


def to_display(image: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """A (C, H, W) tensor in [-1, 1] or uint8 pixels (H, W[, C]) -> (H, W, 3) in [0, 1] for imshow."""
    if isinstance(image, np.ndarray):
        array = (image if image.ndim == 3 else image[..., None]) / 255.0
    else:
        array = ((image.detach().cpu().float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def save_figure(fig: plt.Figure, path: str, dpi: int = 100, top: float = 1.0) -> None:
    """Lays out, writes and closes ``fig``; ``top`` < 1 keeps room for a suptitle."""
    fig.tight_layout(rect=(0, 0, 1, top))
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)
    write_bytes(path, buffer.getvalue())  # atomically: a crash never leaves half an image


def save_roc(labels: np.ndarray, scores: np.ndarray, path: str, title: str) -> None:
    fpr, tpr = image_roc(labels, scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label="image ROC")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    save_figure(fig, path)


#: The loss terms and metrics a learning-curve figure draws, where the log has them.
LOSS_KEYS = ("g", "rec", "adv", "ali", "d", "val_error")
METRIC_KEYS = ("image_auroc", "image_auroc_max", "pixel_auroc", "pixel_auroc_smoothed")


def save_learning_curves(history: list[dict], path: str) -> None:
    """The per-epoch losses and validation error (log scale) and the test AUROCs of a run's log
    against the optimisation step: how the reader tells whether it has converged."""
    steps = [r.get("step", r["epoch"]) for r in history]
    metrics = [k for k in METRIC_KEYS if any(k in r and r[k] is not None for r in history)]
    fig, axes = plt.subplots(1, 1 + bool(metrics), figsize=(5 * (1 + bool(metrics)), 3.4), squeeze=False)
    for key in (k for k in LOSS_KEYS if any(k in r for r in history)):
        points = [(s, r[key]) for s, r in zip(steps, history) if r.get(key) is not None and r[key] > 0]
        axes[0, 0].plot(*zip(*points), marker=".", label=key)
    axes[0, 0].set(yscale="log", xlabel="step", title="losses (epoch means) and validation error")
    if axes[0, 0].lines:
        axes[0, 0].legend(fontsize=7)
    for key in metrics:
        points = [(s, r[key]) for s, r in zip(steps, history) if r.get(key) is not None]
        axes[0, 1].plot(*zip(*points), marker="o", label=key)
    if metrics:
        axes[0, 1].set(xlabel="step", ylim=(0, 1), title="test AUROC")
        axes[0, 1].legend(fontsize=7)
    save_figure(fig, path)


def save_heatmap(image: Union[torch.Tensor, np.ndarray], reconstruction: Optional[torch.Tensor],
                 error_map: np.ndarray, vmax: float, path: str, title: str, mask: Optional[np.ndarray] = None,
                 pred_mask: Optional[np.ndarray] = None) -> None:
    """Input, reconstruction (where given), heat map over the input with its colour bar and the
    contour of the predicted mask (where given), and the ground-truth mask (where known).

    ``image``: a (C, H, W) tensor in [-1, 1] or uint8 pixels (H, W[, 3]). ``vmax`` fixes the
    colour scale, from 0, so heat maps of different images compare.
    """
    panels = [("input", to_display(image))]
    if reconstruction is not None:
        panels.append(("reconstruction", to_display(reconstruction)))
    count = len(panels) + 1 + (mask is not None)
    fig, axes = plt.subplots(1, count, figsize=(3 * count + 0.6, 3.2))
    for ax, (name, picture) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(name)
    heat = axes[len(panels)]
    heat.imshow(panels[0][1])
    shown = heat.imshow(error_map, cmap="jet", alpha=0.5, vmin=0, vmax=max(vmax, 1e-12))
    if pred_mask is not None and pred_mask.any() and not pred_mask.all():  # a contour needs both sides
        heat.contour(pred_mask.astype(np.float32), levels=[0.5], colors="white", linewidths=1.2)
    heat.set_title("anomaly map" + (" (white: predicted)" if pred_mask is not None else ""))
    fig.colorbar(shown, ax=heat, fraction=0.046, pad=0.04)
    if mask is not None:
        axes[-1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        axes[-1].set_title("ground truth")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    save_figure(fig, path, dpi=80, top=0.92)  # room for the suptitle above the panel titles
