"""The study's figures, from the summarised records alone: reconstructions by block size, score
distributions, and AUROC against block size."""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..inference import Scorer
from ..inference.plots import plt, save_figure
from .aggregate import load_arrays, metric
from .plan import Setting


def figure_prefix(name: str) -> str:
    """The start of the file names of a setting's figures: none for the first hazelnut study (and
    its quick version), ``tile_`` for the first magnetic-tile study, the setting's name for the others."""
    return {"full": "", "quick": "", "tile": "tile_"}.get(name, name + "_")


def draw_figures(s: dict[str, Any], setting: Setting, fig_dir: str, prefix: str = "") -> None:
    """Writes each figure whose records exist to ``fig_dir``, file names starting with ``prefix``."""
    os.makedirs(fig_dir, exist_ok=True)
    if setting.until_plateau:
        draw_learning_curves(s, os.path.join(fig_dir, prefix + "learning_curves.png"))
    draw_score_distributions(s, os.path.join(fig_dir, prefix + "score_distributions.png"))
    if setting.block_study:
        draw_reconstructions(s, os.path.join(fig_dir, prefix + "reconstructions_by_block_size.png"))
        draw_auroc_by_block_size(s, setting, os.path.join(fig_dir, prefix + "auroc_vs_block_size.png"))


def draw_reconstructions(s: dict[str, Any], path: str) -> None:
    """Fixed test images and their reconstructions at every block size (as the paper's Figure 5)."""
    shown = {r: next((x for x in rs if "figure" in x), None) for r, rs in s["blocks"].items()}
    shown = {r: load_arrays(x) for r, x in shown.items() if x is not None}
    if not shown:
        return
    first = next(iter(shown.values()))
    labels = next(x for x in s["blocks"][next(iter(shown))] if "figure" in x)["figure"]["labels"]
    rows, cols = len(first["figure_images"]), 1 + len(shown)
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(first["figure_images"][i])
        axes[i, 0].set_title("input, " + ("anomalous" if labels[i] else "normal"), fontsize=8)
        for j, (r, f) in enumerate(sorted(shown.items()), 1):
            axes[i, j].imshow(f["figure_reconstructions"][i])
            axes[i, j].set_title(f"division {r}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    save_figure(fig, path)


def draw_score_distributions(s: dict[str, Any], path: str) -> None:
    """Histograms of the fused score of normal and anomalous test images, DAAD and DAAD+ (seed 0)."""
    models = [m for m in ("daad", "daad+") if s["ablation"].get(m)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        r = s["ablation"][m][0]
        arrays = load_arrays(r)
        labels = arrays["labels"]
        score = Scorer(gamma=r["metrics"]["gamma"]).fuse(arrays["rec"], arrays.get("feat"))
        bins = np.linspace(0, 1, 21)
        ax.hist(score[labels == 0], bins=bins, alpha=0.6, label="normal")
        ax.hist(score[labels == 1], bins=bins, alpha=0.6, label="anomalous")
        ax.set_title(f"{m.upper()} (seed 0), AUROC {r['metrics']['image_auroc']:.3f}", fontsize=9)
        ax.set_xlabel("anomaly score A(x)")
        ax.legend(fontsize=8)
    save_figure(fig, path)


def draw_auroc_by_block_size(s: dict[str, Any], setting: Setting, path: str) -> None:
    """Mean image AUROC (error bars: spread over seeds) against the block size at H/2."""
    points = [(r, metric(rs, "image_auroc")) for r, rs in sorted(s["blocks"].items())]
    points = [(r, m) for r, m in points if m is not None]
    if not points:
        return
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sizes = [setting.network_size // 2 // r for r, _ in points]
    ax.errorbar(sizes, [m[0] for _, m in points], yerr=[m[1] for _, m in points], marker="o", capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size at H/2 (feature pixels)")
    ax.set_ylabel(f"image AUROC ({'magnetic tile' if setting.dataset == 'tile' else 'hazelnut'})")
    ax.set_title("DAAD: AUROC against block size", fontsize=9)
    save_figure(fig, path)


def draw_learning_curves(s: dict[str, Any], path: str) -> None:
    """Seed 0 of each model of the ablation: the validation error (held-out normal images,
    relative to its first epoch) and the test image AUROC (R = max of the smoothed map, on the
    fixed test subset) against the optimisation step; a marker where each run stopped."""
    runs = {m: next((r for r in rs if r["run"]["seed"] == 0), None) for m, rs in s["ablation"].items()}
    runs = {m: r for m, r in runs.items() if r and r.get("history")}
    if not runs:
        return
    fig, (val, test) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, r in runs.items():
        steps = [h["step"] for h in r["history"] if "val_error" in h]
        errors = [h["val_error"] for h in r["history"] if "val_error" in h]
        if errors:
            line, = val.plot(steps, [e / errors[0] for e in errors], label=m)
            val.plot(steps[-1], errors[-1] / errors[0], "o", color=line.get_color())
        evals = [(h["step"], h["image_auroc_max"]) for h in r["history"] if "image_auroc_max" in h]
        if evals:
            test.plot(*zip(*evals), marker=".", label=m)
    val.set_yscale("log")
    val.set(xlabel="step", ylabel="validation error / first epoch's", title="held-out normal images")
    test.set(xlabel="step", ylabel="image AUROC (max of smoothed map)", title="fixed test subset")
    test.axhline(0.5, color="grey", lw=0.5)
    for ax in (val, test):
        ax.legend(fontsize=7)
    save_figure(fig, path)
