"""The raw run records grouped by the study's cells, with mean, spread and count per metric."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional, Sequence

import numpy as np

from ..config import DEFAULT_READING
from .plan import ABLATION, Setting, ablation_division, block_divisions, default_division

#: (mean, standard deviation over seeds, number of seeds)
Summary = tuple[float, float, int]


def load_records(raw_dir: str) -> list[dict[str, Any]]:
    """Every run record of ``raw_dir``; ``record["raw_dir"]`` says where its arrays are."""
    records = [json.load(open(os.path.join(raw_dir, f))) for f in sorted(os.listdir(raw_dir))
               if f.endswith(".json") and f != "study.json"]
    for r in records:
        r["raw_dir"] = raw_dir
    return records


def load_arrays(record: dict[str, Any]) -> dict[str, np.ndarray]:
    """The arrays of a run (test scores, figure images) from its ``.npz``."""
    with np.load(os.path.join(record["raw_dir"], record["arrays"])) as data:
        return {k: data[k] for k in data.files}


def select(records: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    """Records whose run has these field values (a missing ``reading`` is "", as before readings)."""
    return [r for r in records if all(r["run"].get(k, "") == v for k, v in fields.items())]


def stats(values: Sequence[Optional[float]]) -> Optional[Summary]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def metric(records: list[dict[str, Any]], key: str) -> Optional[Summary]:
    return stats([r["metrics"].get(key) for r in records])


def summarise(records: list[dict[str, Any]], setting: Setting) -> dict[str, Any]:
    """The records of every cell the tables, figures and claims use. ``ablation["daad+"]`` is
    DAAD+ with the default reading; ``readings`` holds DAAD+ under each reading studied."""
    data, div = setting.dataset, default_division(setting.size)
    ablation = {m: select(records, dataset=data, model=m, division=ablation_division(m, setting),
                          reading=DEFAULT_READING if m.endswith("+") else "")
                for m in ABLATION}
    readings = {r: select(records, dataset=data, model="daad+", division=div, reading=r)
                for r in setting.readings}
    blocks = {r: select(records, dataset=data, model="daad", division=r) for r in block_divisions(setting.size)}
    mnist = {d: select(records, dataset="mnist", normal_class=d) for d in setting.digits}
    return {"ablation": ablation, "readings": readings, "blocks": blocks, "mnist": mnist}
