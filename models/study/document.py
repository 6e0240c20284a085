"""``RESULTS.md``: one section per study setting found under ``OUT/raw/``, its tables, figures
and the verdicts on the paper's claims, rebuilt from the raw run records alone."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any

from ..training import DEFAULT_READING
from ..training.atomic import atomic_write
from .aggregate import load_records, metric, record_files, summarise
from .claims import CONVERGED_KEYS, PAPER_KEYS, claims, mnist_claims, near_chance
from .figures import draw_figures, figure_prefix
from .plan import ABLATION, SETTINGS, Setting, plan
from .tables import (PAPER_MNIST_MEAN, ablation_table, block_table, budget_table, defect_type_table,
                     diagnosis_table, mnist_table, score_table)

#: The settings whose results make ``docs/RESULTS.md``, in order.
DOC_SETTINGS = ("full", "hazelnut128", "tile", "tile128", "tile128-ssim", "tile128-ssim-long", "tile256-tiled")


def status_lines(setting_name: str, records: list[dict[str, Any]], meta: dict) -> list[str]:
    planned = plan(SETTINGS[setting_name])
    done = {r["name"] for r in records}
    missing = [r.name for r in planned if r.name not in done]
    line = (f"- Runs: {len(planned) - len(missing)} of {len(planned)} finished; wall time so far "
            f"{meta.get('wall_s', 0) / 60:.0f} min ({meta.get('machine', '?')}).")
    if missing:
        line += (f" **Partial**: {len(missing)} runs missing (cells show n < {SETTINGS[setting_name].seeds} "
                 f"or —); resume with `{meta.get('command', f'python -m models.reproduce --setting {setting_name}')}`.")
    return [line]


def seeds(setting: Setting) -> str:
    """The number of seeds with its noun: "3 seeds", "1 seed"."""
    return f"{setting.seeds} seed{'s' if setting.seeds != 1 else ''}"


def budget_line(setting: Setting) -> str:
    """How long the setting's runs train, as the Markdown list item of its section."""
    if setting.steps is None:
        return f"{setting.epochs} epochs"
    error = "mean squared error" if setting.anomaly_map == "l2" else f"mean {setting.anomaly_map} map"
    rule = (f", stopping earlier once the {error} on {setting.val_ratio:.0%} of the normal training "
            f"images, held out, has not improved by 1% over {setting.plateau_window} epochs"
            + (f" (after {setting.plateau_min_steps} steps at least)" if setting.plateau_min_steps else "")
            if setting.until_plateau else "")
    return f"at most {setting.steps} steps{rule}"


def hazelnut_section(name: str, setting: Setting, s: dict[str, Any], records: list, meta: dict) -> list[str]:
    mnist = bool(setting.digits)
    keys = CONVERGED_KEYS if setting.until_plateau else PAPER_KEYS
    out = [f"## Hazelnut{' and MNIST' if mnist else ''} (setting `{name}`)", "",
           f"- Hazelnut at {setting.size}x{setting.size}, width {setting.width}, {budget_line(setting)}; "
           + (f"MNIST at {setting.mnist_size}x{setting.mnist_size}, width {setting.mnist_width}, "
              f"{setting.mnist_epochs} epochs, digits {list(setting.digits)}; " if mnist else "")
           + f"N = {setting.num_items} items per memory; {seeds(setting)}; batch 8, Adam, the paper's "
           "learning rates.",
           "- Data: MVTec AD hazelnut subset (28 training images, 6 good and 17 'colour' test images with "
           "masks)" + ("; MNIST test set, images 0-4999 for training (the normal digit only), 5000-9999 for "
                       "testing." if mnist else "."),
           f"- Command: `{meta.get('command', '?')}` ({meta.get('jobs', '?')} runs in parallel).",
           *status_lines(name, records, meta), "",
           "### Ablation on hazelnut (paper Table 3)", "", *ablation_table(s, setting), ""]
    if setting.until_plateau:
        out += converged_lines(name, setting, s)
    out += ["### Block size (paper Table 4, Figure 5)", "", *block_table(s, setting, keys), "", *plus_lines(setting, s)]
    if mnist:
        out += [f"### MNIST one-class, image AUROC (DAAD+ by the fused A; paper, DAAD: mean {PAPER_MNIST_MEAN:.3f})",
                "", *mnist_table(s), "", "Which of the paper's claims held on MNIST (each digit is its own "
                "comparison: the digits' AUROCs differ far more than their seeds'):", "", *mnist_claims(s), ""]
    out += ["### Which of the paper's claims held on hazelnut", ""]
    image_means = [m[0] for rs in s["ablation"].values() if (m := metric(rs, keys[0][0]))]
    if image_means and min(image_means) >= 0.98:
        out += ["Every model finds (nearly) every anomalous image of this test set (image AUROC "
                f">= {min(image_means):.2f}), so image AUROC cannot separate them here; pixel AUROC, "
                "which asks where the defect is, carries the comparisons.", ""]
    return out + claims(s, keys) + [""]


def converged_lines(name: str, setting: Setting, s: dict[str, Any]) -> list[str]:
    """The training budget of a setting trained to the plateau, and its learning curves."""
    return ["### Training budget: when each run stopped", "", *budget_table(s), "",
            f"Learning curves (seed 0): ![](figures/{figure_prefix(name)}learning_curves.png)", ""]


def plus_lines(setting: Setting, s: dict[str, Any]) -> list[str]:
    """DAAD+ by loss reading, where the setting trains DAAD+."""
    if "daad+" not in setting.models:
        return []
    return ["### DAAD+ by loss reading and score (paper Table 5; R, L, fused)", "", *score_table(s), "",
            "### Training diagnostics of DAAD+ by loss reading", "", *diagnosis_table(s), ""]


def tile_section(name: str, setting: Setting, s: dict[str, Any], records: list, meta: dict) -> list[str]:
    seconds = sorted(r["train_s"] for r in records if r.get("epochs"))  # the baseline trains nothing
    timing = (f"one run trained in {seconds[0] / 60:.0f}-{seconds[-1] / 60:.0f} min on one shared core "
              f"(median {statistics.median(seconds) / 60:.0f} min, more when the machine is busier)"
              if seconds else "no run has finished yet")
    converged, prefix = setting.until_plateau, figure_prefix(name)
    keys = CONVERGED_KEYS if converged else PAPER_KEYS
    tiles = (f"; networks of {setting.tile_size}x{setting.tile_size} trained on random crops, scoring tiles "
             f"{setting.tile_stride} apart stitched into one map" if setting.tile_size else "")
    plus = (f"; DAAD+ in the ablation and the claims by the `{setting.plus_reading}` reading"
            if setting.plus_reading != DEFAULT_READING else "")
    kept = (f" (DAAD+ keeps the other terms and the weights of each reading{plus})"
            if "daad+" in setting.models else "")
    losses = (f"; every run trained by the `{setting.rec_loss}` reconstruction loss{kept} and scored by "
              f"`{setting.anomaly_map}` maps, the mean image too" if setting.rec_loss or setting.anomaly_map != "l2"
              else "")
    trained = ("" if setting.models == ABLATION else
               "; of the ablation's models only " + " and ".join(setting.models))
    out = [f"## Magnetic tile (setting `{name}`)", "",
           f"- {setting.size}x{setting.size} (grayscale read as 3 channels{tiles}), width {setting.width}, "
           f"{budget_line(setting)}; N = {setting.num_items}, {seeds(setting)}, batch 8, Adam, the "
           f"paper's learning rates{losses}{trained}; {timing}.",
           f"- Data: `magnetic_tile/` as a folder data set: a fixed seeded split of `MT_Free/Imgs` "
           f"({setting.train_ratio:.0%} = 476 images train, 476 test) and all 392 defective images of "
           "the five `MT_*/Imgs` folders (masks beside the images, >= 128 is defect).",
           f"- Smoothed scores: Gaussian of sigma = 4 x {setting.size} / 256 pixels (anomalib's 4 at 256x256).",
           f"- Command: `{meta.get('command', '?')}`.", *status_lines(name, records, meta), "",
           "### Ablation (paper Table 3)", "", *ablation_table(s, setting), ""]
    if converged:
        out += converged_lines(name, setting, s)
    out += ["### Image AUROC by defect type (R as the mean / max of the smoothed map; mean over seeds)", "",
            *defect_type_table(s), ""]
    if setting.block_study:
        out += ["### Block size (paper Table 4)", "", *block_table(s, setting, keys), ""]
    figures = (["reconstructions_by_block_size", "score_distributions", "auroc_vs_block_size"] if setting.block_study
               else ["score_distributions"])
    out += [*plus_lines(setting, s), "### Which of the paper's claims held on the magnetic tile", "", *near_chance(s, keys),
            *claims(s, keys), "",
            "Figures: " + " ".join(f"![](figures/{prefix}{f}.png)" for f in figures), ""]
    return out


def results_markdown(parts: list[tuple[str, Setting, dict, list, dict]]) -> str:
    """The document from ``parts``: (setting name, setting, summary, records, study metadata) of
    each setting, in :data:`DOC_SETTINGS` order."""
    out = ["# Results: DAAD and DAAD+ at laptop scale on real data", "",
           "Made by `models/reproduce.py` from the raw runs in `docs/raw/<setting>/` (one JSON record "
           "per run and, for the image data sets, one compressed `.npz` of scores); rebuild with `python -m models.reproduce "
           "--tables-only`. AUROC as mean ± standard deviation over seeds (n = number of seeds). The "
           "paper's numbers are at 256x256 with width 64 and many more epochs; ours are not expected to "
           "match them, only to show the same effects. DAAD+ rows name their loss reading "
           f"(docs/MODELS.md, *Losses*); the default is `{DEFAULT_READING}`, `old` is this project's "
           "first reading. A is the fused score γR + (1-γ)L; image AUROC of the non-adversarial "
           "models is that of R. The first row of each ablation is a detector that learns nothing (the "
           "mean training image, `models/networks/baseline.py`): a data set ranks the models only where "
           "they beat it.", ""]
    for part in parts:
        out += (tile_section if part[1].dataset == "tile" else hazelnut_section)(*part)
        if part[1].dataset == "mvtec":
            prefix = figure_prefix(part[0])
            out += ["## Figures (hazelnut)", "",
                    f"- Reconstructions by block size (as the paper's Figure 5): "
                    f"![](figures/{prefix}reconstructions_by_block_size.png)",
                    f"- Score distributions of normal and anomalous test images: "
                    f"![](figures/{prefix}score_distributions.png)",
                    f"- AUROC against block size: ![](figures/{prefix}auroc_vs_block_size.png)", ""]
    return "\n".join(out)


def build_tables(setting_name: str, out: str) -> str:
    """Writes ``OUT/RESULTS.md`` and ``OUT/figures/`` from ``OUT/raw/<setting>/``: from every
    setting of :data:`DOC_SETTINGS` with a finished run there, or ``setting_name`` alone if it is
    not one of them (the quick study). Returns the Markdown's path."""
    def finished(name: str) -> bool:  # a setting whose study has started has logs before any run
        raw_dir = os.path.join(out, "raw", name)
        return os.path.isdir(raw_dir) and bool(record_files(raw_dir))
    names = [n for n in DOC_SETTINGS if finished(n)] if setting_name in DOC_SETTINGS else [setting_name]
    if not finished(setting_name):
        raise FileNotFoundError(f"no raw runs in {os.path.join(out, 'raw', setting_name)}: run the study first")
    parts = []
    for name in names:
        raw_dir = os.path.join(out, "raw", name)
        setting = SETTINGS[name]
        meta_path = os.path.join(raw_dir, "study.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        records = load_records(raw_dir)
        s = summarise(records, setting)
        draw_figures(s, setting, os.path.join(out, "figures"), figure_prefix(name))
        parts.append((name, setting, s, records, meta))
    path = os.path.join(out, "RESULTS.md")
    text = results_markdown(parts)
    atomic_write(path, lambda f: f.write(text), binary=False)
    return path
