"""The study script's plan, verdicts and table building, on synthetic run records (no training)."""
from dataclasses import asdict

import pytest

from models import reproduce
from models.reproduce import SETTINGS, Run, build_tables, compare, plan, write_json


def test_plan_covers_every_cell_once():
    runs = plan(SETTINGS["full"])
    assert len(runs) == len(set(runs))
    mvtec = [r for r in runs if r.dataset == "mvtec"]
    assert {r.model for r in mvtec} == set(reproduce.ABLATION)
    # 64x64 input: the H/16 map is 4 pixels, so divisions 1, 2 and 4; DAAD's default is 2.
    assert {r.division for r in mvtec if r.model == "daad"} == {1, 2, 4}
    assert {r.division for r in mvtec if r.model == "daad+"} == {2}
    assert {r.normal_class for r in runs if r.dataset == "mnist"} == set(range(10))
    assert len({r.seed for r in runs}) == 3


def _record(run: Run, image: float, pixel: float, feat: bool = False) -> dict:
    metrics = {"gamma": 0.9 if feat else 1.0, "image_auroc": image, "image_auroc_rec": image,
               "pixel_auroc": pixel if run.dataset == "mvtec" else None}
    if feat:
        metrics["image_auroc_feat"] = 0.5
    return {"run": asdict(run), "name": run.name, "metrics": metrics, "labels": [0, 1, 1],
            "rec": [0.1, 0.3, 0.2], "feat": [1.0, 2.0, 3.0] if feat else None, "train_s": 1.0}


def test_tables_and_verdicts_from_raw_records(tmp_path, monkeypatch):
    setting = SETTINGS["quick"]
    raw = tmp_path / "raw" / "quick"
    image = {"ae": 0.80, "memae": 0.85, "ae+skip": 0.70, "daad": 0.90, "daad+": 0.95}
    for run in plan(setting):
        score = image[run.model] if run.dataset == "mvtec" else 0.6
        if run.model == "daad" and run.division != 2:
            score = 0.75  # the intermediate division is best
        write_json(str(raw / f"{run.name}.json"),
                   _record(run, score, score - 0.1, feat=run.model.endswith("+")))
    write_json(str(raw / "study.json"), {"wall_s": 60.0, "jobs": 2, "machine": "test",
                                         "command": "python -m models.reproduce --quick"})
    text = open(build_tables("quick", str(tmp_path))).read()
    assert "| daad+ | 2 | 0.950 ± 0.000 (n=1) | 0.850 ± 0.000 (n=1) | 0.921 |" in text
    assert "1. DAAD beats AE and MemAE: DAAD vs AE, image AUROC: **held** (0.900 vs 0.800)" in text
    assert "2. Skip connections alone hurt: AE vs AE+Skip, image AUROC: **held**" in text
    assert "3. An intermediate block size is best (division 2" in text
    assert "DAAD+ (fused) vs DAAD, image AUROC: **held** (0.950 vs 0.900)" in text
    for figure in ("reconstructions_by_block_size", "score_distributions", "auroc_vs_block_size"):
        if figure != "reconstructions_by_block_size":  # needs reconstructions, not in these records
            assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 0


def test_compare_is_inconclusive_within_the_seed_spread():
    def records(*values):
        return [{"metrics": {"image_auroc": v}} for v in values]
    assert compare(records(0.9, 0.7), records(0.8, 0.8), "image_auroc")[0] == "inconclusive"
    assert compare(records(1.0), records(1.0), "image_auroc")[0] == "inconclusive"
    assert compare(records(0.7), records(0.8), "image_auroc")[0] == "did not hold"
    assert compare([], records(0.8), "image_auroc")[0].startswith("not tested")


def test_tables_only_needs_raw_runs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no raw runs"):
        build_tables("full", str(tmp_path))
