"""Running the study: one run (train, score, write its record) and all runs in parallel.

Every run writes one JSON file (metrics, every test image's scores, wall time) to
``OUT/raw/<setting>/<run name>.json``; a run whose file exists is never repeated, so an
interrupted study resumes where it stopped.
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..atomic import write_json
from ..config import ModelConfig, TrainConfig
from ..data import config_dataset, dataset_channels
from ..distributed import DistContext
from ..inference import collect_scores, compute_metrics
from ..train import train
from .plan import SETTINGS, Run, Setting, plan


def run_config(run: Run, setting: Setting, roots: dict[str, str]) -> TrainConfig:
    """The training settings of one run."""
    mnist = run.dataset == "mnist"
    model = ModelConfig(model=run.model, in_channels=dataset_channels(run.dataset),
                        size=setting.mnist_size if mnist else setting.size,
                        width=setting.mnist_width if mnist else setting.width,
                        division=(run.division, run.division, 1), num_items=setting.num_items)
    return TrainConfig(dataset=run.dataset, root=roots[run.dataset], normal_class=run.normal_class,
                       model=model, epochs=setting.mnist_epochs if mnist else setting.epochs,
                       seed=run.seed)


def execute(run: Run, setting: Setting, roots: dict[str, str], raw_dir: str) -> dict[str, Any]:
    """Trains and scores one run in this process; writes and returns its record."""
    torch.set_num_threads(1)  # runs go in parallel, one core each
    config = run_config(run, setting, roots)
    start = time.perf_counter()
    log_path = os.path.join(raw_dir, "logs", run.name + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
            tempfile.TemporaryDirectory() as tmp:
        train_set = config_dataset(config, "train", augment=True)
        trainer = train(config, tmp, DistContext(0, 1, torch.device("cpu")), train_set)
    train_s = time.perf_counter() - start
    test_set = config_dataset(config, "test")
    scores = collect_scores(trainer.model, test_set, torch.device("cpu"))
    metrics = compute_metrics(scores, config.fusion_gamma)
    record = {"run": asdict(run), "name": run.name, "setting": asdict(setting), "metrics": metrics,
              "labels": scores.labels.tolist(), "rec": scores.rec.tolist(),
              "feat": None if scores.feat is None else scores.feat.tolist(),
              "train_s": round(train_s, 1), "epochs": config.epochs,
              "final_losses": trainer.history[-1] if trainer.history else None}
    if run.seed == 0 and run.dataset != "mnist":  # reconstructions of fixed test images for the figures
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


def _to_uint8(batch: torch.Tensor) -> list:
    """[-1, 1] images (B, C, H, W) as nested lists of 0..255 (H, W, C), small enough for JSON."""
    return ((batch.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).tolist()


def run_study(setting_name: str, out: str, roots: dict[str, str], jobs: int) -> None:
    """Runs every planned run without a record yet, ``jobs`` at a time, then updates ``study.json``."""
    setting = SETTINGS[setting_name]
    raw_dir = os.path.join(out, "raw", setting_name)
    runs = plan(setting)
    todo = [r for r in runs if not os.path.exists(os.path.join(raw_dir, r.name + ".json"))]
    print(f"{setting_name} study: {len(runs)} runs, {len(runs) - len(todo)} already done, {jobs} in parallel",
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
