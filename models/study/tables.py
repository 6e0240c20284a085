"""The study's tables, as Markdown lines: mean ± spread over seeds next to the paper's numbers,
the DAAD+ loss readings side by side with their training diagnostics, and each run's training
budget, from the summarised run records alone (:mod:`.aggregate`)."""
from __future__ import annotations

import statistics
from typing import Any, Optional

from ..networks import ModelConfig
from ..training import DEFAULT_READING, LOSS_READINGS, TrainConfig
from .aggregate import Summary, defect_type_aurocs, metric
from .plan import Setting, default_division

#: The paper's numbers (Hou et al., ICCV 2021) quoted next to ours.
PAPER_HAZELNUT = {"ae": 0.884, "memae": 0.891, "ae+skip": 0.828, "daad": 0.893, "daad+": 0.921}
PAPER_MNIST_MEAN = 0.990
#: MVTec AD mean image AUROC by division rate at 256x256 (paper Table 4).
PAPER_BLOCK = {1: 0.716, 2: 0.784, 4: 0.821, 8: 0.845, 16: 0.813}
#: DAAD+'s default learning rate (the paper's), beside which the study tries others.
PLUS_LR = TrainConfig(model=ModelConfig(model="daad+")).learning_rate
#: The no-learning baseline's row (:func:`models.networks.fit_mean_image`).
BASELINE_NAME = "mean training image (no learning)"


def model_name(model: str, reading: str, lr: float = 0.0) -> str:
    """A model in the tables: a "+" variant with its loss reading and any learning rate not its default."""
    return model if not model.endswith("+") else f"{model} (`{reading}`" + (f", lr {lr:g})" if lr else ")")


def cell(summary: Optional[Summary]) -> str:
    return "—" if summary is None else f"{summary[0]:.3f} ± {summary[1]:.3f} (n={summary[2]})"


#: The ablation's columns: (metric, header). A is the fused score (R alone without a discriminator).
ABLATION_COLUMNS = (("image_auroc", "image AUROC (A, R = mean)"),
                    ("image_auroc_fused_max", "image AUROC (A, R = max of smoothed map)"),
                    ("pixel_auroc_raw", "pixel AUROC"), ("pixel_auroc_smoothed", "pixel AUROC (smoothed)"),
                    ("aupro_smoothed", "AUPRO (smoothed)"))


def ablation_table(s: dict[str, Any], setting: Setting) -> list[str]:
    div, hazelnut = default_division(setting.network_size), setting.dataset == "mvtec"

    def row(name: str, division: Any, rs: list, paper: str) -> str:
        return (f"| {name} | {division} | " + " | ".join(cell(metric(rs, k)) for k, _ in ABLATION_COLUMNS) + " |"
                + (f" {paper} |" if hazelnut else ""))

    out = ["| model | division | " + " | ".join(header for _, header in ABLATION_COLUMNS) + " |"
           + (" paper (hazelnut) |" if hazelnut else ""),
           "|---|---|" + "---|" * len(ABLATION_COLUMNS) + ("---|" if hazelnut else ""),
           row(BASELINE_NAME, "—", s["baseline"], "—")]
    for m, rs in s["ablation"].items():
        out.append(row(model_name(m, s["plus_reading"]), div if m in ("daad", "daad+") else "—", rs,
                       f"{PAPER_HAZELNUT[m]:.3f}"))
    return out


def budget_table(s: dict[str, Any]) -> list[str]:
    """How long each model of the ablation trained: steps, why runs stopped, minutes, and the
    final validation error (mean squared pixel error on held-out normal images)."""
    out = ["| model | steps (min-max) | stopped at the plateau / at the step limit | minutes a run (median) "
           "| final validation error |", "|---|---|---|---|---|"]
    for m, rs in s["ablation"].items():
        if not rs:
            out.append(f"| {model_name(m, s['plus_reading'])} | — | — | — | — |")
            continue
        steps = [r.get("steps", 0) for r in rs]
        stops = [r.get("stopped") for r in rs]
        errors = [h["val_error"] for r in rs if (h := (r.get("history") or [{}])[-1]) and "val_error" in h]
        out.append(f"| {model_name(m, s['plus_reading'])} | {min(steps)}-{max(steps)} | {stops.count('plateau')} / "
                   f"{stops.count('steps')} | {statistics.median(r['train_s'] for r in rs) / 60:.0f} "
                   f"| {_mean(errors)} |")
    return out


def block_table(s: dict[str, Any], setting: Setting, keys: tuple[tuple[str, str], ...]) -> list[str]:
    """DAAD by division rate, by each (metric, name) of ``keys``, beside the paper's Table 4."""
    out = ["| division | block sizes (H/2..H/16) | paper's division at 256 | "
           + " | ".join(name for _, name in keys) + " | paper (MVTec mean) |", "|---|---|---|" + "---|" * (len(keys) + 1)]
    for r, rs in s["blocks"].items():
        sizes = "/".join(str(setting.network_size // 2 ** (k + 1) // r) for k in range(4))
        paper_r = r * 256 // setting.network_size
        paper = f"{PAPER_BLOCK[paper_r]:.3f}" if paper_r in PAPER_BLOCK else "—"
        out.append(f"| {r} | {sizes} | {paper_r} | " + " | ".join(cell(metric(rs, k)) for k, _ in keys)
                   + f" | {paper} |")
    return out


def defect_type_table(s: dict[str, Any]) -> list[str]:
    """Image AUROC of each defect type alone, by R (mean) and by the max of the smoothed map."""
    rows = {BASELINE_NAME: s["baseline"], **{model_name(m, s["plus_reading"]): rs for m, rs in s["ablation"].items()}}
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


def reading_name(reading: str, records: list[dict[str, Any]], rec_loss: Optional[str] = None) -> str:
    """A loss reading with the losses its ``records`` trained by, else those the reading names with
    L_rec replaced by ``rec_loss`` where the setting replaces it."""
    spec = (records[0]["losses"] if records and "losses" in records[0]
            else {**LOSS_READINGS[reading], **({"rec_loss": rec_loss} if rec_loss else {})})
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
        rows.append((reading_name(r, rs, s["rec_loss"]), rs))
        if r == s["plus_reading"]:  # then the ablation's reading at the other learning rates
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
