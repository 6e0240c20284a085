"""The study's verdicts and ``RESULTS.md``: tables of mean ± spread next to the paper's numbers,
the DAAD+ loss readings side by side with their training diagnostics, and which of the paper's
claims held, rebuilt from the raw run records alone."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional

from ..networks import ModelConfig
from ..training import DEFAULT_READING, LOSS_READINGS, TrainConfig
from ..training.atomic import atomic_write
from .aggregate import Summary, defect_type_aurocs, load_records, metric, summarise
from .claims import claims, mnist_claims, near_chance
from .figures import draw_figures
from .plan import SETTINGS, Setting, default_division, plan

#: The paper's numbers (Hou et al., ICCV 2021) quoted next to ours.
PAPER_HAZELNUT = {"ae": 0.884, "memae": 0.891, "ae+skip": 0.828, "daad": 0.893, "daad+": 0.921}
PAPER_MNIST_MEAN = 0.990
#: MVTec AD mean image AUROC by division rate at 256x256 (paper Table 4).
PAPER_BLOCK = {1: 0.716, 2: 0.784, 4: 0.821, 8: 0.845, 16: 0.813}
#: The settings whose results make ``docs/RESULTS.md``, in order.
DOC_SETTINGS = ("full", "tile")
#: DAAD+'s default learning rate (the paper's), beside which the study tries others.
PLUS_LR = TrainConfig(model=ModelConfig(model="daad+")).learning_rate
#: The no-learning baseline's row (:func:`models.networks.fit_mean_image`).
BASELINE_NAME = "mean training image (no learning)"


def model_name(model: str, reading: str = DEFAULT_READING, lr: float = 0.0) -> str:
    """A model in the tables: a "+" variant with its loss reading and any learning rate not its default."""
    return model if not model.endswith("+") else f"{model} (`{reading}`" + (f", lr {lr:g})" if lr else ")")


def cell(summary: Optional[Summary]) -> str:
    return "—" if summary is None else f"{summary[0]:.3f} ± {summary[1]:.3f} (n={summary[2]})"


def ablation_table(s: dict[str, Any], setting: Setting) -> list[str]:
    div, hazelnut = default_division(setting.size), setting.dataset == "mvtec"

    def row(name: str, division: Any, rs: list, paper: str) -> str:
        keys = ("image_auroc", "image_auroc_max", "pixel_auroc", "pixel_auroc_smoothed")
        return (f"| {name} | {division} | " + " | ".join(cell(metric(rs, k)) for k in keys) + " |"
                + (f" {paper} |" if hazelnut else ""))

    out = ["| model | division | image AUROC (A, R = mean) | image AUROC (max of smoothed map) | pixel AUROC "
           "| pixel AUROC (smoothed) |" + (" paper (hazelnut) |" if hazelnut else ""),
           "|---|---|---|---|---|---|" + ("---|" if hazelnut else ""),
           row(BASELINE_NAME, "—", s["baseline"], "—")]
    for m, rs in s["ablation"].items():
        out.append(row(model_name(m), div if m in ("daad", "daad+") else "—", rs, f"{PAPER_HAZELNUT[m]:.3f}"))
    return out


def block_table(s: dict[str, Any], setting: Setting) -> list[str]:
    out = ["| division | block sizes (H/2..H/16) | paper's division at 256 | image AUROC | pixel AUROC "
           "| paper (MVTec mean) |", "|---|---|---|---|---|---|"]
    for r, rs in s["blocks"].items():
        sizes = "/".join(str(setting.size // 2 ** (k + 1) // r) for k in range(4))
        paper_r = r * 256 // setting.size
        paper = f"{PAPER_BLOCK[paper_r]:.3f}" if paper_r in PAPER_BLOCK else "—"
        out.append(f"| {r} | {sizes} | {paper_r} | {cell(metric(rs, 'image_auroc'))} "
                   f"| {cell(metric(rs, 'pixel_auroc'))} | {paper} |")
    return out


def defect_type_table(s: dict[str, Any]) -> list[str]:
    """Image AUROC of each defect type alone, by R (mean) and by the max of the smoothed map."""
    rows = {BASELINE_NAME: s["baseline"], **{model_name(m): rs for m, rs in s["ablation"].items()}}
    by_score = {name: {score: defect_type_aurocs(rs, score) for score in ("rec", "max")}
                for name, rs in rows.items()}
    types = list(dict.fromkeys(t for scores in by_score.values() for t in scores["rec"]))
    if not types:
        return ["(no run recorded the defect type of its test images)"]
    out = ["| model | " + " | ".join(t.split("/")[0].removeprefix("MT_") for t in types) + " |",
           "|---|" + "---|" * len(types)]
    for name, scores in by_score.items():
        cells = [" / ".join("—" if (v := scores[k].get(t)) is None else f"{v[0]:.2f}" for k in ("rec", "max"))
                 for t in types]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def reading_name(reading: str) -> str:
    spec = LOSS_READINGS[reading]
    weights = " ".join(f"{w:g}" for w in spec["loss_weights"])
    reset = f", D reset < {spec['d_reset']:g}" if spec["d_reset"] else ""
    default = " **(default)**" if reading == DEFAULT_READING else ""
    return f"`{reading}`{default}: rec {spec['rec_loss']}, ali {spec['ali_loss']}, weights {weights}{reset}"


def score_table(s: dict[str, Any]) -> list[str]:
    """DAAD+ under each loss reading, by every score (paper Table 5 and the anomalib score)."""
    out = ["| model, losses | R (mean) | max of smoothed map | L | fused A (R = mean, γ = 0.9) "
           "| fused A (R = max) | pixel AUROC |", "|---|---|---|---|---|---|---|"]
    daad = s["ablation"]["daad"]
    out.append(f"| DAAD | {cell(metric(daad, 'image_auroc_rec'))} | {cell(metric(daad, 'image_auroc_max'))} "
               f"| — | — | — | {cell(metric(daad, 'pixel_auroc'))} |")
    rows = []
    for r, rs in s["readings"].items():
        rows.append((reading_name(r), rs))
        if r == DEFAULT_READING:  # then the default reading at the other learning rates
            rows += [(f"`{r}` at lr {lr:g} (default {PLUS_LR:g})", lr_rs) for lr, lr_rs in s.get("lrs", {}).items()]
    for name, rs in rows:
        out.append(f"| DAAD+, {name} | {cell(metric(rs, 'image_auroc_rec'))} "
                   f"| {cell(metric(rs, 'image_auroc_max'))} | {cell(metric(rs, 'image_auroc_feat'))} "
                   f"| {cell(metric(rs, 'image_auroc'))} | {cell(metric(rs, 'image_auroc_fused_max'))} "
                   f"| {cell(metric(rs, 'pixel_auroc'))} |")
    return out


def _mean(values: list[Optional[float]]) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.3g}" if values else "—"


def diagnosis_table(s: dict[str, Any]) -> list[str]:
    """What each loss reading does to training: the last epoch's losses, D's accuracy, resets,
    and the share of the generator's gradient from each term (first and last epoch); means over seeds."""
    out = ["| losses | L_rec | L_adv | L_ali | D loss | D accuracy | epochs with a D reset | gradient share rec / adv / ali, "
           "epoch 1 | same, last epoch |", "|---|---|---|---|---|---|---|---|---|"]
    for r, rs in s["readings"].items():
        if not rs:
            continue
        last = [(x.get("history") or [x.get("final_losses") or {}])[-1] for x in rs]
        first_share = [(x.get("history") or [{}])[0].get("grad_share") for x in rs]
        last_share = [last_record.get("grad_share") for last_record in last]
        resets = [sum(h.get("d_reset", 0.0) > 0 for h in x["history"]) if "history" in x else None
                  for x in rs]

        def shares(values: list[Optional[dict]]) -> str:
            values = [v for v in values if v]
            return " / ".join(_mean([v.get(k) for v in values]) for k in ("rec", "adv", "ali")) if values else "—"
        out.append(f"| `{r}` | {_mean([h.get('rec') for h in last])} | {_mean([h.get('adv') for h in last])} "
                   f"| {_mean([h.get('ali') for h in last])} | {_mean([h.get('d') for h in last])} "
                   f"| {_mean([h.get('d_acc') for h in last])} | {_mean(resets)} "
                   f"| {shares(first_share)} | {shares(last_share)} |")
    out += ["", "Losses are the last epoch's means, in each reading's own units (so L_rec and L_ali "
            "are not comparable across readings; the gradient shares are): the norm of the generator's "
            "gradient from each weighted term alone, as a share of their sum, on one batch. `old` rows "
            "of runs made before this log existed show only their last losses."]
    return out


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


def hazelnut_section(name: str, setting: Setting, s: dict[str, Any], records: list, meta: dict) -> list[str]:
    out = [f"## Hazelnut and MNIST (setting `{name}`)", "",
           f"- Hazelnut at {setting.size}x{setting.size}, width {setting.width}, {setting.epochs} epochs; "
           f"MNIST at {setting.mnist_size}x{setting.mnist_size}, width {setting.mnist_width}, "
           f"{setting.mnist_epochs} epochs, digits {list(setting.digits)}; N = {setting.num_items} items per "
           f"memory; {setting.seeds} seeds; batch 8, Adam, the paper's learning rates.",
           "- Data: MVTec AD hazelnut subset (28 training images, 6 good and 17 'colour' test images with "
           "masks); MNIST test set, images 0-4999 for training (the normal digit only), 5000-9999 for testing.",
           f"- Command: `{meta.get('command', '?')}` ({meta.get('jobs', '?')} runs in parallel).",
           *status_lines(name, records, meta), "",
           "### Ablation on hazelnut (paper Table 3)", "", *ablation_table(s, setting), "",
           "### Block size (paper Table 4, Figure 5)", "", *block_table(s, setting), "",
           "### DAAD+ by loss reading and score (paper Table 5)", "", *score_table(s), "",
           "### Training diagnostics of DAAD+ by loss reading", "", *diagnosis_table(s), "",
           f"### MNIST one-class, image AUROC (DAAD+ by the fused A; paper, DAAD: mean {PAPER_MNIST_MEAN:.3f})", "",
           *mnist_table(s), "", "Which of the paper's claims held on MNIST (each digit is its own "
           "comparison: the digits' AUROCs differ far more than their seeds'):", "", *mnist_claims(s),
           "", "### Which of the paper's claims held on hazelnut", ""]
    image_means = [m[0] for rs in s["ablation"].values() if (m := metric(rs, "image_auroc"))]
    if image_means and min(image_means) >= 0.98:
        out += ["Every model finds (nearly) every anomalous image of this test set (image AUROC "
                f">= {min(image_means):.2f}), so image AUROC cannot separate them here; pixel AUROC, "
                "which asks where the defect is, carries the comparisons.", ""]
    return out + claims(s) + [""]


def mnist_table(s: dict[str, Any]) -> list[str]:
    """Image AUROC by normal digit, one column per model (DAAD+ by its fused score A)."""
    columns = s["mnist"]
    out = ["| normal digit | " + " | ".join(model_name(*c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
    digits = list(next(iter(columns.values()), {}))
    for d in digits:
        out.append(f"| {d} | " + " | ".join(cell(metric(c[d], "image_auroc")) for c in columns.values()) + " |")
    common = [d for d in digits if all(c[d] for c in columns.values())]  # means over the same digits
    if common:
        means = [statistics.mean(metric(c[d], "image_auroc")[0] for d in common) for c in columns.values()]
        out.append(f"| mean of {len(common)} digits | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    return out


def tile_section(name: str, setting: Setting, s: dict[str, Any], records: list, meta: dict) -> list[str]:
    seconds = sorted(r["train_s"] for r in records if r.get("epochs"))  # the baseline trains nothing
    timing = (f"at 64x64 one run trained in {seconds[0] / 60:.0f}-{seconds[-1] / 60:.0f} min on one shared "
              f"core (median {statistics.median(seconds) / 60:.0f} min, more when the machine is busier), "
              f"and the {len(plan(setting))} runs must fit about two hours; a probe at 128x128 (10 "
              "epochs) scored no better (docs/MODELS.md, *Which data set can tell the models apart*)"
              if seconds else "no run has finished yet")
    return [f"## Magnetic tile (setting `{name}`)", "",
            f"- {setting.size}x{setting.size} (grayscale read as 3 channels), width {setting.width}, "
            f"{setting.epochs} epochs, N = {setting.num_items}, {setting.seeds} seeds, batch 8, Adam, the "
            f"paper's learning rates. The smallest size the issue allows: {timing}.",
            f"- Data: `magnetic_tile/` as a folder data set: a fixed seeded split of `MT_Free/Imgs` "
            f"({setting.train_ratio:.0%} = 476 images train, 476 test) and all 392 defective images of "
            "the five `MT_*/Imgs` folders (masks beside the images, >= 128 is defect).",
            "- Smoothed scores: Gaussian of sigma = 4 x 64 / 256 = 1 pixel (anomalib's 4 at 256x256).",
            f"- Command: `{meta.get('command', '?')}`.", *status_lines(name, records, meta), "",
            "### Ablation (paper Table 3)", "", *ablation_table(s, setting), "",
            "### Image AUROC by defect type (R as the mean / max of the smoothed map; mean over seeds)", "",
            *defect_type_table(s), "",
            "### Block size (paper Table 4)", "", *block_table(s, setting), "",
            "### DAAD+ by loss reading and score (paper Table 5; R, L, fused; old and new defaults)", "",
            *score_table(s), "",
            "### Training diagnostics of DAAD+ by loss reading", "", *diagnosis_table(s), "",
            "### Which of the paper's claims held on the magnetic tile", "", *near_chance(s), *claims(s), "",
            "Figures: ![](figures/tile_reconstructions_by_block_size.png) "
            "![](figures/tile_score_distributions.png) ![](figures/tile_auroc_vs_block_size.png)", ""]


def results_markdown(parts: dict[str, tuple[str, Setting, dict, list, dict]]) -> str:
    """The document from ``parts``: "full" (hazelnut and MNIST) and "tile", each (setting name,
    setting, summary, records, study metadata)."""
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
    if "full" in parts:
        out += hazelnut_section(*parts["full"])
    if "tile" in parts:
        out += tile_section(*parts["tile"])
    if "full" in parts:
        out += ["## Figures (hazelnut)", "",
                "- Reconstructions by block size (as the paper's Figure 5): "
                "![](figures/reconstructions_by_block_size.png)",
                "- Score distributions of normal and anomalous test images: ![](figures/score_distributions.png)",
                "- AUROC against block size: ![](figures/auroc_vs_block_size.png)", ""]
    return "\n".join(out)


def build_tables(setting_name: str, out: str) -> str:
    """Writes ``OUT/RESULTS.md`` and ``OUT/figures/`` from ``OUT/raw/<setting>/``: from every
    setting of :data:`DOC_SETTINGS` found there, or ``setting_name`` alone if it is not one of
    them (the quick study). Returns the Markdown's path."""
    names = [n for n in DOC_SETTINGS if os.path.isdir(os.path.join(out, "raw", n))] \
        if setting_name in DOC_SETTINGS else [setting_name]
    if not names or not os.path.isdir(os.path.join(out, "raw", names[0])):
        raise FileNotFoundError(f"no raw runs in {os.path.join(out, 'raw', setting_name)}: run the study first")
    parts = {}
    for name in names:
        raw_dir = os.path.join(out, "raw", name)
        setting = SETTINGS[name]
        meta_path = os.path.join(raw_dir, "study.json")
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        records = load_records(raw_dir)
        s = summarise(records, setting)
        draw_figures(s, setting, os.path.join(out, "figures"), "tile_" if setting.dataset == "tile" else "")
        parts["tile" if setting.dataset == "tile" else "full"] = (name, setting, s, records, meta)
    path = os.path.join(out, "RESULTS.md")
    text = results_markdown(parts)
    atomic_write(path, lambda f: f.write(text), binary=False)
    return path
