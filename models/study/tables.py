"""The study's verdicts and ``RESULTS.md``: tables of mean ± spread next to the paper's numbers,
and which of the paper's claims held, rebuilt from the raw run records alone."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from ..atomic import atomic_write
from .aggregate import Summary, load_records, metric, summarise
from .figures import draw_figures
from .plan import SETTINGS, Setting, default_division

#: The paper's numbers (Hou et al., ICCV 2021) quoted next to ours.
PAPER_HAZELNUT = {"ae": 0.884, "memae": 0.891, "ae+skip": 0.828, "daad": 0.893, "daad+": 0.921}
PAPER_MNIST_MEAN = 0.990
#: MVTec AD mean image AUROC by division rate at 256x256 (paper Table 4).
PAPER_BLOCK = {1: 0.716, 2: 0.784, 4: 0.821, 8: 0.845, 16: 0.813}


def cell(summary: Optional[Summary]) -> str:
    return "—" if summary is None else f"{summary[0]:.3f} ± {summary[1]:.3f} (n={summary[2]})"


def compare(better: list[dict[str, Any]], worse: list[dict[str, Any]], key: str) -> tuple[str, str]:
    """Verdict on "``better`` scores above ``worse``" by ``key``, and the numbers behind it.

    Inconclusive when either side is missing, or the means differ by no more than the larger
    standard deviation over seeds (equal means included, as when both are at the ceiling of 1).
    """
    a, b = metric(better, key), metric(worse, key)
    if a is None or b is None:
        return "not tested (runs missing)", ""
    numbers = f"{a[0]:.3f} vs {b[0]:.3f}"
    if abs(a[0] - b[0]) <= max(a[1], b[1]) or a[0] == b[0]:
        return "inconclusive", numbers + ", within the seed spread"
    return ("held" if a[0] > b[0] else "did not hold"), numbers


def claims(s: dict[str, Any]) -> list[str]:
    """Plain statements of which of the paper's claims held, by image and by pixel AUROC."""
    ab = s["ablation"]

    def claim(title: str, pairs: list[tuple[str, list, list]]) -> str:
        parts = []
        for label, better, worse in pairs:
            for key, what in (("image_auroc", "image"), ("pixel_auroc", "pixel")):
                verdict, numbers = compare(better, worse, key)
                parts.append(f"{label}, {what} AUROC: **{verdict}**" + (f" ({numbers})" if numbers else ""))
        return f"{title}: " + "; ".join(parts) + "."

    blocks = {r: rs for r, rs in s["blocks"].items() if rs}
    lines = [claim("1. DAAD beats AE and MemAE", [("DAAD vs AE", ab["daad"], ab["ae"]),
                                                  ("DAAD vs MemAE", ab["daad"], ab["memae"])]),
             claim("2. Skip connections alone hurt", [("AE vs AE+Skip", ab["ae"], ab["ae+skip"])])]
    if len(blocks) >= 3:
        means = {r: metric(rs, "image_auroc")[0] for r, rs in blocks.items()}
        extremes = (min(blocks), max(blocks))
        # On a tie, prefer an intermediate size: the comparison below then calls it inconclusive.
        best = max(means, key=lambda r: (means[r], r not in extremes))
        if best in extremes:
            lines.append(f"3. An intermediate block size is best: **did not hold** by image AUROC "
                         f"(best: division {best}).")
        else:
            lines.append(claim(f"3. An intermediate block size is best (division {best} has the "
                               "highest mean image AUROC)",
                               [(f"division {best} vs {r}", blocks[best], blocks[r]) for r in extremes]))
    else:
        lines.append("3. An intermediate block size is best: **not tested** (fewer than three block sizes).")
    lines.append(claim("4. The adversarial representation adds to DAAD",
                       [("DAAD+ (fused) vs DAAD", ab["daad+"], ab["daad"])]))
    return lines


def results_markdown(s: dict[str, Any], setting_name: str, setting: Setting, meta: dict) -> str:
    div = default_division(setting.size)
    out = ["# Results: DAAD at laptop scale on real data", "",
           "Made by `models/reproduce.py` from the raw runs in "
           f"`docs/raw/{setting_name}/` (one JSON file per run); rebuild with "
           "`python -m models.reproduce --tables-only`. Image AUROC, mean ± standard deviation over "
           "seeds (n = number of seeds). The paper's numbers are at 256x256 with width 64 and many "
           "more epochs; ours are not expected to match them, only to show the same effects.", "",
           "## Settings", "",
           f"- Setting `{setting_name}`: hazelnut at {setting.size}x{setting.size}, width "
           f"{setting.width}, {setting.epochs} epochs; MNIST at {setting.mnist_size}x"
           f"{setting.mnist_size}, width {setting.mnist_width}, {setting.mnist_epochs} epochs, "
           f"digits {list(setting.digits)}; N = {setting.num_items} items per memory; "
           f"{setting.seeds} seed(s); batch 8, Adam, the paper's losses and learning rates.",
           f"- Command: `{meta.get('command', '?')}` ({meta.get('jobs', '?')} runs in parallel).",
           f"- Machine: {meta.get('machine', '?')}; wall time {meta.get('wall_s', 0) / 60:.0f} min.",
           "- Data: MVTec AD hazelnut subset (28 training images, 6 good and 17 'colour' test "
           "images with masks); MNIST test set, images 0-4999 for training (the normal digit only), "
           "5000-9999 for testing.", "",
           "## Ablation on hazelnut (paper Table 3)", "",
           "| model | division | image AUROC | pixel AUROC | paper (hazelnut) |", "|---|---|---|---|---|"]
    for m, rs in s["ablation"].items():
        d = div if m in ("daad", "daad+") else "—"
        out.append(f"| {m} | {d} | {cell(metric(rs, 'image_auroc'))} | {cell(metric(rs, 'pixel_auroc'))} "
                   f"| {PAPER_HAZELNUT[m]:.3f} |")
    out += ["", "## Block size (paper Table 4, Figure 5)", "",
            "| division | block sizes (H/2..H/16) | paper's division at 256 | image AUROC | pixel AUROC "
            "| paper (MVTec mean) |", "|---|---|---|---|---|---|"]
    for r, rs in s["blocks"].items():
        sizes = "/".join(str(setting.size // 2 ** (k + 1) // r) for k in range(4))
        paper_r = r * 256 // setting.size
        paper = f"{PAPER_BLOCK[paper_r]:.3f}" if paper_r in PAPER_BLOCK else "—"
        out.append(f"| {r} | {sizes} | {paper_r} | {cell(metric(rs, 'image_auroc'))} "
                   f"| {cell(metric(rs, 'pixel_auroc'))} | {paper} |")
    plus = s["ablation"]["daad+"]
    out += ["", "## Adversarial representation (paper Table 5)", "",
            "| model, score | image AUROC |", "|---|---|",
            f"| DAAD, R | {cell(metric(s['ablation']['daad'], 'image_auroc'))} |",
            f"| DAAD+, R only | {cell(metric(plus, 'image_auroc_rec'))} |",
            f"| DAAD+, L only | {cell(metric(plus, 'image_auroc_feat'))} |",
            f"| DAAD+, fused (γ = 0.9) | {cell(metric(plus, 'image_auroc'))} |",
            "", f"## MNIST one-class, DAAD (paper: mean {PAPER_MNIST_MEAN:.3f})", "",
            "| normal digit | image AUROC |", "|---|---|"]
    for d, rs in s["mnist"].items():
        out.append(f"| {d} | {cell(metric(rs, 'image_auroc'))} |")
    digit_means = [metric(rs, "image_auroc")[0] for rs in s["mnist"].values() if rs]
    if digit_means:
        out.append(f"| mean of {len(digit_means)} digits | {statistics.mean(digit_means):.3f} |")
    out += ["", "## Which of the paper's claims held at this scale", ""]
    image_means = [m[0] for rs in s["ablation"].values() if (m := metric(rs, "image_auroc"))]
    if image_means and min(image_means) >= 0.98:
        out += ["Every model finds (nearly) every anomalous image of this test set (image AUROC "
                f">= {min(image_means):.2f}), so image AUROC cannot separate them here; pixel AUROC, "
                "which asks where the defect is, carries the comparisons.", ""]
    out += claims(s)
    out += ["", "## Figures", "",
            "- Reconstructions by block size (as the paper's Figure 5): "
            "![](figures/reconstructions_by_block_size.png)",
            "- Score distributions of normal and anomalous test images: ![](figures/score_distributions.png)",
            "- AUROC against block size: ![](figures/auroc_vs_block_size.png)", ""]
    return "\n".join(out)


def build_tables(setting_name: str, out: str) -> str:
    """Writes ``OUT/RESULTS.md`` and ``OUT/figures/`` from ``OUT/raw/<setting>/``; returns the Markdown's path."""
    raw_dir = os.path.join(out, "raw", setting_name)
    if not os.path.isdir(raw_dir):
        raise FileNotFoundError(f"no raw runs in {raw_dir}: run the study first")
    setting = SETTINGS[setting_name]
    meta_path = os.path.join(raw_dir, "study.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    s = summarise(load_records(raw_dir), setting)
    draw_figures(s, setting, os.path.join(out, "figures"))
    path = os.path.join(out, "RESULTS.md")
    text = results_markdown(s, setting_name, setting, meta)
    atomic_write(path, lambda f: f.write(text), binary=False)
    return path
