"""The raw run records grouped by the study's cells, with mean, spread and count per metric."""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any, Optional, Sequence

import numpy as np

from ..inference.metrics import image_auroc
from .plan import (ABLATION, BASELINE, Run, Setting, ablation_division, block_divisions, default_division,
                   mnist_cells)

#: (mean, standard deviation over seeds, number of seeds)
Summary = tuple[float, float, int]


def record_files(raw_dir: str) -> list[str]:
    """The names of the run records in ``raw_dir`` (one JSON file per finished run), sorted."""
    return [f for f in sorted(os.listdir(raw_dir)) if f.endswith(".json") and f != "study.json"]


def load_records(raw_dir: str) -> list[dict[str, Any]]:
    """Every run record of ``raw_dir``; ``record["raw_dir"]`` says where its arrays are."""
    records = [json.load(open(os.path.join(raw_dir, f))) for f in record_files(raw_dir)]
    for r in records:
        r["raw_dir"] = raw_dir
        # A with R = max is R alone for the models without a discriminator (as A with R = mean is);
        # the study's pixel_auroc is of the raw maps (runs made before pixel_auroc_raw existed)
        r["metrics"].setdefault("image_auroc_fused_max", r["metrics"].get("image_auroc_max"))
        r["metrics"].setdefault("pixel_auroc_raw", r["metrics"].get("pixel_auroc"))
    return records


def load_arrays(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a run (test scores, figure images) from its ``.npz``."""
    with np.load(os.path.join(record["raw_dir"], record["arrays"])) as data:
        return {k: data[k] for k in data.files}


#: A field missing from a record made before it existed has its default value.
RUN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Run)}


def select(records: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    """Records whose run has these field values."""
    return [r for r in records if all(r["run"].get(k, RUN_DEFAULTS[k]) == v for k, v in fields.items())]


def stats(values: Sequence[Optional[float]]) -> Optional[Summary]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def metric(records: list[dict[str, Any]], key: str) -> Optional[Summary]:
    return stats([r["metrics"].get(key) for r in records])


def summarise(records: list[dict[str, Any]], setting: Setting) -> dict[str, Any]:
    """The records of every cell the tables, figures and claims use. ``ablation`` has the models the
    setting trains (:attr:`~models.study.plan.Setting.models`); ``ablation["daad+"]`` is
    DAAD+ with the setting's ``plus_reading``, which ``plus_reading`` names (``rec_loss``: the
    setting's L_rec in place of each reading's, or None); ``readings`` holds
    DAAD+ under each reading studied, ``lrs`` under ``plus_reading`` at each other learning rate
    studied; ``mnist`` the records of each MNIST column (:func:`~models.study.plan.mnist_cells`) by digit."""
    data, div, plus = setting.dataset, default_division(setting.network_size), setting.plus_reading
    ablation = {m: select(records, dataset=data, model=m, division=ablation_division(m, setting),
                          reading=plus if m.endswith("+") else "", lr=0.0)
                for m in ABLATION if m in setting.models}
    readings = {r: select(records, dataset=data, model="daad+", division=div, reading=r, lr=0.0)
                for r in setting.readings}
    lrs = {lr: select(records, dataset=data, model="daad+", division=div, reading=plus, lr=lr)
           for lr in setting.plus_lrs}
    divisions = block_divisions(setting.network_size) if setting.block_study else [div]
    blocks = {r: select(records, dataset=data, model="daad", division=r) for r in divisions}
    mnist = {(m, r, lr): {d: select(records, dataset="mnist", model=m, normal_class=d, reading=r, lr=lr)
                          for d in setting.digits}
             for m, r, lr in mnist_cells(setting)}
    return {"ablation": ablation, "readings": readings, "lrs": lrs, "blocks": blocks, "mnist": mnist,
            "baseline": select(records, dataset=data, model=BASELINE), "plus_reading": plus,
            "rec_loss": setting.rec_loss}


def defect_type_aurocs(records: list[dict[str, Any]], score: str) -> dict[str, Optional[Summary]]:
    """Image AUROC of each defect type alone (its images against every normal test image) by
    ``score``, an array of the runs' ``.npz`` ("rec": R as the mean, "max": max of the smoothed
    map); mean and spread over ``records``, by the type's folder name."""
    by_type: dict[str, list[float]] = {}
    for r in records:
        if "defect_types" not in r:
            continue
        arrays = load_arrays(r)
        kind, values, normal = arrays["defect_type"], arrays[score], arrays["defect_type"] < 0
        for i, name in enumerate(r["defect_types"]):
            pick = normal | (kind == i)
            by_type.setdefault(name, []).append(image_auroc((kind[pick] >= 0).astype(int), values[pick]))
    return {name: stats(values) for name, values in by_type.items()}

