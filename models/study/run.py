"""Running the study: one run (train, score, write its record) and all runs in parallel.

Every run writes to ``OUT/raw/<setting>/``: ``<run name>.json`` (its settings, metrics, per-epoch
log, wall time; no path of the machine) and, for the image data sets, ``<run name>.npz``
(compressed arrays: every test image's scores and defect type and, for seed 0, reconstructions of
four fixed test images for the figures; MNIST's tables need only the metrics, so its 5,000 test
scores a run are not kept). The JSON is written last, so a run whose JSON exists is finished and never repeated: an interrupted
study resumes where it stopped; a run cut short resumes from its last epoch (its checkpoint in
``OUT/raw/<setting>/work/<run name>/`` until it finishes).
"""
from __future__ import annotations

import concurrent.futures as futures
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import numpy as np
import torch

from ..data import layout
from ..inference import RunScoring, Scorer, collect_scores, compute_metrics
from ..networks import ModelConfig, fit_mean_image
from ..training import CHECKPOINT, LOSS_READINGS, Resume, RunOptions, TrainConfig, train
from ..training.atomic import write_json, write_npz
from ..training.checkpoint import load_checkpoint
from ..training.distributed import DistContext
from .plan import BASELINE, SETTINGS, Run, Setting, plan

#: A study run saves its checkpoint every this many minutes (and after its last epoch). Saved after
#: every epoch, hazelnut128's division-1 runs (0.75 GB, 3 steps an epoch) took 12-17 s an epoch
#: for 5-7 s of training: a save takes 3-9 s on this machine.
CHECKPOINT_MINUTES = 10.0
#: The magnetic tile below its root: normal images, and one folder per defect type (masks beside).
TILE_NORMAL = "MT_Free/Imgs"
TILE_DEFECTS = tuple(f"MT_{kind}/Imgs" for kind in ("Blowhole", "Break", "Crack", "Fray", "Uneven"))


def run_config(run: Run, setting: Setting, roots: dict[str, str]) -> TrainConfig:
    """The training settings of one run."""
    mnist = run.dataset == "mnist"
    dataset = {"mvtec": "mvtec", "mnist": "mnist", "tile": "folder"}[run.dataset]
    name = "ae" if run.model == BASELINE else run.model  # the baseline trains nothing; it reads data as the AE
    model = ModelConfig(model=name, in_channels=layout(dataset).channels,
                        size=setting.mnist_size if mnist else setting.size,
                        width=setting.mnist_width if mnist else setting.width,
                        division=(run.division, run.division, 1), num_items=setting.num_items)
    extra: dict[str, Any] = dict(LOSS_READINGS[run.reading]) if run.reading else {}
    extra.update(anomaly_map=setting.anomaly_map, **({"rec_loss": setting.rec_loss} if setting.rec_loss else {}))
    data: dict[str, Any] = {"normal_class": run.normal_class} if mnist else {}
    if run.dataset == "tile":
        data.update(normal_dir=TILE_NORMAL, abnormal_dirs=TILE_DEFECTS, train_ratio=setting.train_ratio)
    budget = {k: getattr(setting, k) for k in ("steps", "val_ratio", "until_plateau", "plateau_window",
                                               "plateau_min_steps", "eval_every", "eval_subset")}
    tiling = {} if mnist else {"tile_size": setting.tile_size, "tile_stride": setting.tile_stride}
    return TrainConfig(dataset=dataset, root=roots[run.dataset], data=data, model=model,
                       epochs=setting.mnist_epochs if mnist else setting.epochs, seed=run.seed, lr=run.lr or None,
                       **budget, **extra, **tiling)


def trained_losses(config: TrainConfig) -> dict[str, Any]:
    """The loss settings a run trained by, as its record keeps them (the tables name DAAD+ by them)."""
    return {k: config.to_dict()[k] for k in ("rec_loss", "ali_loss", "d_reset", "loss_weights")}


def defect_types(names: Sequence[str], labels: np.ndarray, root: str) -> tuple[list[str], np.ndarray]:
    """Each test image's defect type, the folder below ``root`` that holds it (no path of the
    machine), as an index into the returned folder names in test-set order; -1 for normal images."""
    folders = [os.path.relpath(os.path.dirname(n), root) if label else "" for n, label in zip(names, labels)]
    types = list(dict.fromkeys(f for f in folders if f))
    return types, np.array([types.index(f) if f else -1 for f in folders], np.int8)


def execute(run: Run, setting: Setting, roots: dict[str, str], raw_dir: str) -> dict[str, Any]:
    """Trains and scores one run in this process; writes and returns its record."""
    torch.set_num_threads(1)  # runs go in parallel, one core each
    config = run_config(run, setting, roots)
    start = time.perf_counter()
    log_path = os.path.join(raw_dir, "logs", run.name + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    # The run trains in OUT/raw/<setting>/work/<run>/, saving a checkpoint every epoch: a run cut
    # short (the machine's session ended) goes on from its last epoch when the study is rerun.
    work = os.path.join(raw_dir, "work", run.name)
    checkpoint = os.path.join(work, CHECKPOINT)
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        train_set = config.dataset_split("train", augment=True)
        trained = run.model != BASELINE
        if not trained:
            model, history = fit_mean_image(train_set.without_augmentation()), []
        else:
            cpu = DistContext(0, 1, torch.device("cpu"))
            resume = Resume(load_checkpoint(checkpoint), checkpoint) if os.path.exists(checkpoint) else None
            trainer = train(config, work, cpu, train_set, RunScoring(config, train_set, cpu.device), resume,
                            RunOptions(checkpoint_minutes=CHECKPOINT_MINUTES))
            model, history = trainer.model, trainer.history
    # the epochs' own times where the training spanned several processes
    train_s = sum(h.get("time_s", 0.0) for h in history) if history else time.perf_counter() - start
    test_set = config.dataset_split("test")
    scorer = Scorer.for_run(config, "mean")  # the paper's reading in image_auroc; both Rs are reported
    scores = collect_scores(model, test_set, torch.device("cpu"), scorer)
    metrics, image = compute_metrics(scores, scorer)
    arrays = {"labels": scores.labels.astype(np.int8), "rec": image.mean.astype(np.float32),
              "max": image.max.astype(np.float32)}
    if scores.feat is not None:
        arrays["feat"] = scores.feat.astype(np.float32)
    types: dict[str, Any] = {}
    if run.dataset != "mnist":  # for the AUROC of each defect type
        types["defect_types"], arrays["defect_type"] = defect_types(test_set.names, scores.labels, config.root)
    # The training images' scores: what a score rule may learn from without seeing an anomaly.
    train_scores = collect_scores(model, train_set.without_augmentation(), torch.device("cpu"), scorer)
    arrays["train_rec"] = scorer.image_scores(train_scores.maps, None).mean.astype(np.float32)
    if train_scores.feat is not None:
        arrays["train_feat"] = train_scores.feat.astype(np.float32)
    figure = None
    if run.seed == 0 and run.dataset != "mnist" and trained:  # reconstructions of test images for the figures
        picks = [int(np.flatnonzero(scores.labels == label)[0]) for label in (0, 1)]
        picks += [int(np.flatnonzero(scores.labels == label)[-1]) for label in (0, 1)]
        images = torch.stack([test_set[i]["image"] for i in picks])
        recon = model.eval().score(images).reconstruction  # stitched from the tiles in a tiled run
        arrays.update(figure_images=_to_uint8(images), figure_reconstructions=_to_uint8(recon))
        figure = {"indices": picks, "labels": [int(scores.labels[i]) for i in picks]}
    keep = run.dataset != "mnist"
    if keep:
        write_npz(os.path.join(raw_dir, run.name + ".npz"), **arrays)
    losses = trained_losses(config)
    record = {"run": asdict(run), "name": run.name, "setting": asdict(setting), "metrics": metrics,
              **({"losses": losses, "lr": config.learning_rate} if trained else {}), "train_s": round(train_s, 1),
              "epochs": history[-1]["epoch"] if history else 0, "steps": history[-1]["step"] if history else 0,
              "stopped": history[-1].get("stopped") if history else None, "history": history,
              "arrays": run.name + ".npz" if keep else None, **types, **({"figure": figure} if figure else {})}
    write_json(os.path.join(raw_dir, run.name + ".json"), record)
    shutil.rmtree(work, ignore_errors=True)  # finished: its record holds what the tables read
    return record


def _to_uint8(batch: torch.Tensor) -> np.ndarray:
    """[-1, 1] images (B, C, H, W) as uint8 (B, H, W, C)."""
    return ((batch.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def run_study(setting_name: str, out: str, roots: dict[str, str], jobs: int) -> None:
    """Runs every planned run without a record yet, ``jobs`` at a time, then updates ``study.json``."""
    setting = SETTINGS[setting_name]
    raw_dir = os.path.join(out, "raw", setting_name)
    runs = plan(setting)
    todo = [r for r in runs if not os.path.exists(os.path.join(raw_dir, r.name + ".json"))]
    print(f"{setting_name} study: {len(runs)} runs, {len(runs) - len(todo)} already done, {jobs} in parallel",
          flush=True)
    start = time.perf_counter()
    meta_path = os.path.join(raw_dir, "study.json")

    def write_meta() -> None:  # after every run, so that a killed study still counts its time
        previous = json.load(open(meta_path)) if os.path.exists(meta_path) else {"wall_s": 0.0}
        write_json(meta_path, {"setting": setting_name, "jobs": jobs,
                               "wall_s": round(previous["wall_s"] + time.perf_counter() - start, 1),
                               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                                          f"Python {platform.python_version()}",
                               "command": portable_command(sys.argv[1:])})

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
            write_meta()
            start = time.perf_counter()
    write_meta()


def portable_command(args: list[str]) -> str:
    """The command line without the machine's absolute paths (the values of path options)."""
    words, skip = ["python -m models.reproduce"], False
    for arg in args:
        if skip:
            words.append("PATH")
        elif "=" in arg and arg.startswith("--") and os.path.isabs(arg.split("=", 1)[1]):
            words.append(arg.split("=", 1)[0] + "=PATH")
        else:
            words.append(arg)
        skip = arg in ("--out", "--data-root", "--hazelnut", "--mnist", "--tile") and not skip
    return " ".join(words)
