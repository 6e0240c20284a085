"""The raw run records grouped by the study's cells, with mean, spread and count per metric."""
from __future__ import annotations

import json
import os
import statistics
from typing import Any, Optional, Sequence

from .plan import ABLATION, Setting, ablation_division, block_divisions

#: (mean, standard deviation over seeds, number of seeds)
Summary = tuple[float, float, int]


def load_records(raw_dir: str) -> list[dict[str, Any]]:
    return [json.load(open(os.path.join(raw_dir, f))) for f in sorted(os.listdir(raw_dir))
            if f.endswith(".json") and f != "study.json"]


def select(records: list[dict[str, Any]], **fields: Any) -> list[dict[str, Any]]:
    return [r for r in records if all(r["run"][k] == v for k, v in fields.items())]


def stats(values: Sequence[Optional[float]]) -> Optional[Summary]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def metric(records: list[dict[str, Any]], key: str) -> Optional[Summary]:
    return stats([r["metrics"].get(key) for r in records])


def summarise(records: list[dict[str, Any]], setting: Setting) -> dict[str, Any]:
    """The records of every cell the tables, figures and claims use."""
    ablation = {m: select(records, dataset="mvtec", model=m, division=ablation_division(m, setting))
                for m in ABLATION}
    blocks = {r: select(records, dataset="mvtec", model="daad", division=r)
              for r in block_divisions(setting.size)}
    mnist = {d: select(records, dataset="mnist", normal_class=d) for d in setting.digits}
    return {"ablation": ablation, "blocks": blocks, "mnist": mnist}
