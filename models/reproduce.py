"""Reproduce the paper's findings at laptop scale on real data: ``python -m models.reproduce``.

Runs, each for several seeds, with the ``models`` pipeline (fused CPU kernel where it exists):

* ablation (paper Table 3) on the MVTec AD hazelnut subset: AE, MemAE, AE+Skip, DAAD, DAAD+;
* block sizes (Table 4, Figure 5): DAAD with every division rate the input size allows;
* adversarial scores (Table 5): DAAD+ scored by R only, by L only, and by the fused score;
* MNIST one-class on the real test set (index split, see :mod:`models.data`): DAAD per digit
  (DAAD+ is unstable at this scale with the paper's loss weights: see docs/MODELS.md).

Every run writes one JSON file (metrics, every test image's scores, wall time) to
``OUT/raw/<setting>/``; a finished run is never repeated, so an interrupted study resumes where it
stopped. Then ``OUT/RESULTS.md`` and the figures in ``OUT/figures/`` are rebuilt from those files
alone (``--tables-only`` does just that).

At 64x64 input the memories see maps of 32, 16, 8 and 4 pixels: division 2 gives the block sizes
(16, 8, 4, 2) of the paper's division 8 at 256x256, and divisions 1, 2, 4 correspond to the
paper's 4, 8, 16.

Example:
    python -m models.reproduce --quick --jobs 2        # a reduced study, under 10 minutes
    python -m models.reproduce --jobs 2                # the full study, about 2 hours on 2 cores
    python -m models.reproduce --tables-only           # rebuild docs/RESULTS.md from the raw runs
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from .checkpoint import atomic_write

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

#: The paper's numbers (Hou et al., ICCV 2021) quoted next to ours.
PAPER_HAZELNUT = {"ae": 0.884, "memae": 0.891, "ae+skip": 0.828, "daad": 0.893, "daad+": 0.921}
PAPER_MNIST_MEAN = 0.990
#: MVTec AD mean image AUROC by division rate at 256x256 (paper Table 4).
PAPER_BLOCK = {1: 0.716, 2: 0.784, 4: 0.821, 8: 0.845, 16: 0.813}
ABLATION = ("ae", "memae", "ae+skip", "daad", "daad+")


@dataclass(frozen=True)
class Setting:
    """Sizes and budgets of one version of the study."""

    size: int            # hazelnut input size
    width: int
    epochs: int
    mnist_size: int
    mnist_width: int
    mnist_epochs: int
    digits: tuple[int, ...]
    seeds: int
    num_items: int = 500


SETTINGS = {
    "full": Setting(size=64, width=16, epochs=100, mnist_size=32, mnist_width=16, mnist_epochs=10,
                    digits=tuple(range(10)), seeds=3),
    "quick": Setting(size=64, width=8, epochs=10, mnist_size=32, mnist_width=8, mnist_epochs=2,
                     digits=(0, 1), seeds=1),
}


@dataclass(frozen=True)
class Run:
    dataset: str          # "mvtec" or "mnist"
    model: str
    division: int         # rh = rw; rc = 1
    seed: int
    normal_class: int = 0

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.model}-div{self.division}-class{self.normal_class}-seed{self.seed}"


def block_divisions(size: int) -> list[int]:
    """Division rates r (r x r x 1) that divide the smallest memory map, size / 16."""
    return [r for r in range(1, size // 16 + 1) if (size // 16) % r == 0]


def default_division(size: int) -> int:
    """The rate whose blocks match the paper's division 8 at 256x256: 8 * size / 256, at least 1."""
    return max(1, size * 8 // 256)


def plan(setting: Setting) -> list[Run]:
    """Every run of the study, ablation first (shared cells are listed once)."""
    seeds = range(setting.seeds)
    div = default_division(setting.size)
    runs = [Run("mvtec", m, div if m in ("daad", "daad+") else 1, s) for m in ABLATION for s in seeds]
    runs += [Run("mvtec", "daad", r, s) for r in block_divisions(setting.size) if r != div for s in seeds]
    mnist_div = default_division(setting.mnist_size)
    runs += [Run("mnist", "daad", mnist_div, s, digit) for digit in setting.digits for s in seeds]
    return runs


# ----------------------------------------------------------------------------- one run


def execute(run: Run, setting: Setting, roots: dict[str, str], raw_dir: str) -> dict[str, Any]:
    """Trains and scores one run in this process; writes and returns its record."""
    import numpy as np
    import torch

    from .config import ModelConfig, TrainConfig
    from .data import build_dataset, dataset_channels
    from .distributed import DistContext
    from .inference import collect_scores, compute_metrics
    from .train import train

    torch.set_num_threads(1)  # runs go in parallel, one core each
    mnist = run.dataset == "mnist"
    size = setting.mnist_size if mnist else setting.size
    model = ModelConfig(model=run.model, in_channels=dataset_channels(run.dataset), size=size,
                        width=setting.mnist_width if mnist else setting.width,
                        division=(run.division, run.division, 1), num_items=setting.num_items)
    config = TrainConfig(dataset=run.dataset, root=roots[run.dataset], normal_class=run.normal_class,
                         model=model, epochs=setting.mnist_epochs if mnist else setting.epochs,
                         seed=run.seed)
    data = dict(size=size, normal_class=run.normal_class)
    start = time.perf_counter()
    log_path = os.path.join(raw_dir, "logs", run.name + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            tempfile.TemporaryDirectory() as tmp:
        train_set = build_dataset(run.dataset, config.root, "train", augment=True, **data)
        trainer = train(config, tmp, DistContext(0, 1, torch.device("cpu")), train_set)
    train_s = time.perf_counter() - start
    test_set = build_dataset(run.dataset, config.root, "test", **data)
    scores = collect_scores(trainer.model, test_set, torch.device("cpu"))
    metrics = compute_metrics(scores, config.fusion_gamma, test_set.has_masks)
    record = {"run": asdict(run), "name": run.name, "setting": asdict(setting), "metrics": metrics,
              "labels": scores.labels.tolist(), "rec": scores.rec.tolist(),
              "feat": None if scores.feat is None else scores.feat.tolist(),
              "train_s": round(train_s, 1), "epochs": config.epochs,
              "final_losses": trainer.history[-1] if trainer.history else None}
    if run.seed == 0 and not mnist:  # reconstructions of fixed test images for the figures
        picks = [int(np.flatnonzero(scores.labels == label)[0]) for label in (0, 1)]
        picks += [int(np.flatnonzero(scores.labels == label)[-1]) for label in (0, 1)]
        images = torch.stack([test_set[i]["image"] for i in picks])
        with torch.no_grad():
            trainer.model.eval()
            recon = trainer.model.generator(images).reconstruction
        record["figure"] = {"indices": picks, "labels": [int(scores.labels[i]) for i in picks],
                            "images": _to_uint8(images), "reconstructions": _to_uint8(recon)}
    write_json(os.path.join(raw_dir, run.name + ".json"), record)
    return record


def _to_uint8(batch) -> list:
    """[-1, 1] images (B, C, H, W) as nested lists of 0..255 (H, W, C), small enough for JSON."""
    return ((batch.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).tolist()


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` atomically: a reader never sees half a file, a crash never loses the old one."""
    atomic_write(path, lambda f: json.dump(payload, f), binary=False)


def run_study(setting_name: str, out: str, roots: dict[str, str], jobs: int) -> None:
    setting = SETTINGS[setting_name]
    raw_dir = os.path.join(out, "raw", setting_name)
    todo = [r for r in plan(setting) if not os.path.exists(os.path.join(raw_dir, r.name + ".json"))]
    total = len(plan(setting))
    print(f"{setting_name} study: {total} runs, {total - len(todo)} already done, {jobs} in parallel",
          flush=True)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        pending = {pool.submit(execute, r, setting, roots, raw_dir): r for r in todo}
        for done, future in enumerate(futures.as_completed(pending), 1):
            run = pending[future]
            try:
                record = future.result()
            except Exception as e:  # one failed run must not cost the others; rerun to retry it
                print(f"[{done}/{len(todo)}] {run.name}: FAILED: {e!r}", flush=True)
                continue
            print(f"[{done}/{len(todo)}] {run.name}: image AUROC {record['metrics']['image_auroc']:.3f} "
                  f"({record['train_s']:.0f} s)", flush=True)
    meta_path = os.path.join(raw_dir, "study.json")
    previous = json.load(open(meta_path)) if os.path.exists(meta_path) else {"wall_s": 0.0}
    write_json(meta_path, {"setting": setting_name, "jobs": jobs,
                           "wall_s": round(previous["wall_s"] + time.perf_counter() - start, 1),
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                      f"Python {platform.python_version()}",
                           "command": "python -m models.reproduce " + " ".join(sys.argv[1:])})


# ----------------------------------------------------------------------------- tables


def load_records(raw_dir: str) -> list[dict[str, Any]]:
    return [json.load(open(os.path.join(raw_dir, f))) for f in sorted(os.listdir(raw_dir))
            if f.endswith(".json") and f != "study.json"]


def select(records, **fields) -> list[dict[str, Any]]:
    return [r for r in records if all(r["run"][k] == v for k, v in fields.items())]


def stats(values: Sequence[Optional[float]]) -> Optional[tuple[float, float, int]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def cell(summary: Optional[tuple[float, float, int]]) -> str:
    return "—" if summary is None else f"{summary[0]:.3f} ± {summary[1]:.3f} (n={summary[2]})"


def metric(records, key: str) -> Optional[tuple[float, float, int]]:
    return stats([r["metrics"].get(key) for r in records])


def summarise(records: list[dict[str, Any]], setting: Setting) -> dict[str, Any]:
    """Every number the tables, figures and claims use."""
    div = default_division(setting.size)
    ablation = {m: select(records, dataset="mvtec", model=m,
                          division=div if m in ("daad", "daad+") else 1) for m in ABLATION}
    blocks = {r: select(records, dataset="mvtec", model="daad", division=r)
              for r in block_divisions(setting.size)}
    mnist = {d: select(records, dataset="mnist", normal_class=d) for d in setting.digits}
    return {"ablation": ablation, "blocks": blocks, "mnist": mnist}


def compare(better, worse, key: str) -> tuple[str, str]:
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
            "", "## MNIST one-class, DAAD (paper: mean 0.990)", "",
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


# ----------------------------------------------------------------------------- figures


def draw_figures(s: dict[str, Any], setting: Setting, fig_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .scoring import fuse_scores

    os.makedirs(fig_dir, exist_ok=True)
    shown = {r: next((x["figure"] for x in rs if "figure" in x), None) for r, rs in s["blocks"].items()}
    shown = {r: f for r, f in shown.items() if f is not None}
    if shown:
        first = next(iter(shown.values()))
        rows, cols = len(first["images"]), 1 + len(shown)
        fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2 * rows), squeeze=False)
        for i in range(rows):
            axes[i, 0].imshow(np.array(first["images"][i], dtype=np.uint8))
            axes[i, 0].set_title("input, " + ("anomalous" if first["labels"][i] else "normal"), fontsize=8)
            for j, (r, f) in enumerate(sorted(shown.items()), 1):
                axes[i, j].imshow(np.array(f["reconstructions"][i], dtype=np.uint8))
                axes[i, j].set_title(f"division {r}", fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "reconstructions_by_block_size.png"), dpi=100)
        plt.close(fig)

    models = [m for m in ("daad", "daad+") if s["ablation"][m]]
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.2), squeeze=False)
        for ax, m in zip(axes[0], models):
            r = s["ablation"][m][0]
            labels = np.array(r["labels"])
            feat = None if r["feat"] is None else np.array(r["feat"])
            score = fuse_scores(np.array(r["rec"]), feat, r["metrics"]["gamma"])
            bins = np.linspace(0, 1, 21)
            ax.hist(score[labels == 0], bins=bins, alpha=0.6, label="normal")
            ax.hist(score[labels == 1], bins=bins, alpha=0.6, label="anomalous")
            ax.set_title(f"{m.upper()} (seed 0), AUROC {r['metrics']['image_auroc']:.3f}", fontsize=9)
            ax.set_xlabel("anomaly score A(x)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "score_distributions.png"), dpi=100)
        plt.close(fig)

    points = [(r, metric(rs, "image_auroc")) for r, rs in sorted(s["blocks"].items())]
    points = [(r, m) for r, m in points if m is not None]
    if points:
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        sizes = [setting.size // 2 // r for r, _ in points]
        ax.errorbar(sizes, [m[0] for _, m in points], yerr=[m[1] for _, m in points], marker="o",
                    capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block size at H/2 (feature pixels)")
        ax.set_ylabel("image AUROC (hazelnut)")
        ax.set_title("DAAD: AUROC against block size", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(fig_dir, "auroc_vs_block_size.png"), dpi=100)
        plt.close(fig)


def build_tables(setting_name: str, out: str) -> str:
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


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.reproduce", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the reduced study (under 10 minutes)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one core each (default: 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default: docs/ for the full study, runs/reproduce-quick for --quick)")
    p.add_argument("--hazelnut", default=str(DEFAULT_DATA / "mvtec_hazelnut_subset"))
    p.add_argument("--mnist", default=str(DEFAULT_DATA / "mnist_t10k"))
    p.add_argument("--tables-only", action="store_true", help="only rebuild RESULTS.md and figures")
    args = p.parse_args(argv)
    setting = "quick" if args.quick else "full"
    out = args.out or str(REPO / ("runs/reproduce-quick" if args.quick else "docs"))
    if not args.tables_only:
        for path in (args.hazelnut, args.mnist):
            if not os.path.isdir(path):
                p.error(f"data folder not found: {path}")
        run_study(setting, out, {"mvtec": args.hazelnut, "mnist": args.mnist}, args.jobs)
    print("wrote", build_tables(setting, out))


if __name__ == "__main__":
    main()
