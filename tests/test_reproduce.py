"""The study behind ``python -m models.reproduce``: its plan, verdicts, tables and resumption, on
synthetic run records (no training)."""
import json
import re
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from models import reproduce
from models.networks import fit_mean_image
from models.training.atomic import write_json, write_npz
from models.study.aggregate import defect_type_aurocs, select
from models.study.plan import ABLATION, BASELINE, SETTINGS, Run, Setting, plan
from models.study.run import defect_types, execute, portable_command, run_config, run_study, trained_losses
from models.study.claims import CONVERGED_KEYS, claims, compare, mnist_claims, near_chance
from models.study.document import build_tables
from models.study.tables import mnist_table


def test_plan_covers_every_cell_once():
    runs = plan(SETTINGS["full"])
    assert len(runs) == len(set(runs)) and len({r.name for r in runs}) == len(runs)
    mvtec = [r for r in runs if r.dataset == "mvtec"]
    assert {r.model for r in mvtec} == {*ABLATION, BASELINE}
    assert [r for r in mvtec if r.model == BASELINE] == [Run("mvtec", BASELINE, 1, 0)]  # no seed to vary
    # 64x64 input: the H/16 map is 4 pixels, so divisions 1, 2 and 4; DAAD's default is 2.
    assert {r.division for r in mvtec if r.model == "daad"} == {1, 2, 4}
    assert {r.division for r in mvtec if r.model == "daad+"} == {2}
    assert {r.reading for r in mvtec if r.model == "daad+"} == {"old", "paper", "ganomaly"}
    assert {r.reading for r in mvtec if r.model != "daad+"} == {""}
    mnist = [r for r in runs if r.dataset == "mnist"]
    assert {r.normal_class for r in mnist} == set(range(10))
    # DAAD, then DAAD+ under each MNIST reading: every digit of a seed before the next seed
    cells = [("daad", "", 0.0), ("daad+", "paper", 0.0), ("daad+", "old", 0.0), ("daad+", "paper", 1e-4),
             ("ae", "", 0.0), ("memae", "", 0.0), ("ae+skip", "", 0.0)]
    for model, reading, lr in cells:
        cell = [r for r in mnist if (r.model, r.reading, r.lr) == (model, reading, lr)]
        assert {(r.normal_class, r.seed) for r in cell} == {(d, s) for d in range(10) for s in range(3)}
    # in that order, every digit of a seed before the next seed
    assert [(r.model, r.reading, r.lr) for r in mnist[::30]] == cells
    assert [r.seed for r in mnist[30:41]] == [0] * 10 + [1]
    # the default learning rate leaves the names as they were; another one is in the name
    assert {r.name for r in runs if r.model == "daad+" and r.lr} >= {"mvtec-daad+-div2-class0-seed0-paper-lr0.0001"}
    assert "mvtec-daad+-div2-class0-seed0-paper" in {r.name for r in runs}
    assert len({r.seed for r in runs}) == 3


def test_tile_plan_puts_the_most_telling_runs_first():
    runs = plan(SETTINGS["tile"])
    # the baseline; per seed DAAD, DAAD+ by 3 readings and at lr 1e-4, AE, MemAE, AE+Skip, 2 more divisions
    assert {r.dataset for r in runs} == {"tile"} and len(runs) == len(set(runs)) == 1 + 3 * (5 + 3 + 2)
    assert runs[0].model == BASELINE and {r.seed for r in runs[:11]} == {0}  # the baseline, every cell of seed 0
    assert [(r.model, r.reading, r.lr) for r in runs[1:6]] == [
        ("daad", "", 0.0), ("daad+", "paper", 0.0), ("ae", "", 0.0), ("daad+", "paper", 1e-4),
        ("daad+", "ganomaly", 0.0)]
    # then DAAD, DAAD+ (default reading) and the AE of the other seeds, then DAAD+'s learning rate and readings
    assert [(r.model, r.reading, r.seed) for r in runs[11:17]] == [
        ("daad", "", 1), ("daad+", "paper", 1), ("ae", "", 1), ("daad", "", 2), ("daad+", "paper", 2), ("ae", "", 2)]
    assert [(r.reading, r.lr, r.seed) for r in runs[17:23]] == [
        (reading, lr, seed) for seed in (1, 2) for reading, lr in (("paper", 1e-4), ("ganomaly", 0.0), ("old", 0.0))]


def test_the_ssim_study_trains_and_scores_every_run_by_ssim_and_skips_the_block_sizes():
    setting, roots = SETTINGS["tile128-ssim"], {"tile": "unused"}
    runs = plan(setting)
    assert len(runs) == 1 + 3 * (len(ABLATION) + 1) and {r.division for r in runs if r.model == "daad"} == {4}
    for run in runs:
        config = run_config(run, setting, roots)
        assert (config.anomaly_map, config.rec_loss) == ("ssim", "ssim"), run.name
    # DAAD+ in the ablation (seed 0's first cells) weights SSIM for its scale; `paper` keeps its weights
    assert [(r.model, r.reading) for r in runs[1:4]] == [("daad", ""), ("daad+", "ssim"), ("ae", "")]
    assert {r.reading for r in runs if r.model == "daad+"} == {"ssim", "paper"}
    plus = run_config(Run("tile", "daad+", 4, 0, reading="ssim"), setting, roots)
    assert (plus.ali_loss, plus.loss_weights) == ("norm", (5000.0, 0.5, 0.5))
    paper = run_config(Run("tile", "daad+", 4, 0, reading="paper"), setting, roots)
    assert (paper.ali_loss, paper.loss_weights) == ("norm", (50.0, 0.5, 0.5))  # the reading's other terms
    plain = run_config(Run("tile", "daad+", 4, 0, reading="paper"), SETTINGS["tile128"], roots)
    assert (plain.anomaly_map, plain.rec_loss) == ("l2", "norm")


def test_a_setting_rejects_an_ablation_reading_it_does_not_study():
    with pytest.raises(ValueError, match="plus_reading 'ssim' is not one of the readings"):
        replace(SETTINGS["tile128"], plus_reading="ssim")


def _record(run: Run, image: float, pixel: float, raw, feat: bool = False) -> dict:
    pixel = pixel if run.dataset != "mnist" else None
    metrics = {"gamma": 0.9 if feat else 1.0, "image_auroc": image, "image_auroc_rec": image,
               "pixel_auroc": pixel, "pixel_auroc_raw": pixel}
    arrays = {"labels": np.array([0, 1, 1], np.int8), "rec": np.array([0.1, 0.3, 0.2], np.float32)}
    if feat:
        metrics["image_auroc_feat"] = 0.5
        arrays["feat"] = np.array([1.0, 2.0, 3.0], np.float32)
    write_npz(str(raw / f"{run.name}.npz"), **arrays)
    history = [{"epoch": 1, "rec": 0.1, "adv": 1.0, "ali": 2.0, "d": 0.5, "d_acc": 0.75, "d_reset": 0.0,
                "grad_share": {"rec": 0.5, "adv": 0.25, "ali": 0.25}}] if feat else []
    return {"run": asdict(run), "name": run.name, "metrics": metrics, "arrays": f"{run.name}.npz",
            "history": history, "train_s": 1.0}


#: Data folders that no test opens: run_config only names them.
ROOTS = {"mvtec": "unused", "mnist": "unused", "tile": "unused"}


def write_quick_study(out, setting: str = "quick") -> None:
    """Records of every run of a study: DAAD+ > DAAD > MemAE > AE > AE+Skip, the default division
    best. A setting trained to the plateau gets the metrics it is judged by (score + 0.02) and a
    history of validation errors and test AUROCs, DAAD stopping at the plateau, the others at the
    step limit."""
    raw = out / "raw" / setting
    raw.mkdir(parents=True)
    image = {"ae": 0.80, "memae": 0.85, "ae+skip": 0.70, "daad": 0.90, "daad+": 0.95, BASELINE: 0.60}
    default = SETTINGS[setting].size * 8 // 256
    for run in plan(SETTINGS[setting]):
        score = image[run.model] if run.dataset != "mnist" else 0.6
        if run.dataset != "mnist" and run.model == "daad" and run.division != default:
            score = 0.75
        record = _record(run, score, score - 0.1, raw, feat=run.model.endswith("+"))
        if SETTINGS[setting].until_plateau:
            record["metrics"].update(image_auroc_max=score + 0.02, pixel_auroc_smoothed=score - 0.08,
                                     aupro_smoothed=score - 0.18)
        if run.model != BASELINE:
            record["losses"] = trained_losses(run_config(run, SETTINGS[setting], ROOTS))
        if SETTINGS[setting].until_plateau and run.model != BASELINE:
            record["history"] = [{"epoch": e, "step": 50 * e, "val_error": 1.0 / e, "image_auroc_max": 0.5 + e / 10}
                                 for e in (1, 2, 3)]
            record.update(steps=150, stopped="plateau" if run.model == "daad" else "steps", epochs=3)
        write_json(str(raw / f"{run.name}.json"), record)
    write_json(str(raw / "study.json"), {"wall_s": 60.0, "jobs": 2, "machine": "test",
                                         "command": f"python -m models.reproduce --setting {setting}"})


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", text)]


def table_row(markdown: str, first_cell: str) -> list[float]:
    """The numbers of the table row whose first cell is ``first_cell``."""
    (row,) = [line for line in markdown.splitlines() if line.startswith(f"| {first_cell} |")]
    return numbers(row[len(first_cell) + 3:])


def claim(markdown: str, label: str) -> tuple[str, list[float]]:
    """The verdict of one comparison in the claims, and the numbers behind it."""
    match = re.search(rf"{re.escape(label)}: \*\*([a-z ]+)\*\*(?: \(([^)]*)\))?", markdown)
    assert match, label
    return match.group(1), numbers(match.group(2) or "")


def test_tables_and_verdicts_from_raw_records(tmp_path):
    write_quick_study(tmp_path)
    text = open(build_tables("quick", str(tmp_path))).read()
    # model | division | image mean ± sd (n) | pixel mean ± sd (n) | paper
    # model | division | image mean ± sd (n) | max (—) | pixel | smoothed pixel (—) | paper
    assert table_row(text, "daad+ (`paper`)") == pytest.approx([2, 0.95, 0.0, 1, 0.85, 0.0, 1, 0.921])
    assert table_row(text, "ae") == pytest.approx([0.80, 0.0, 1, 0.70, 0.0, 1, 0.884])  # no division
    # division | block sizes 32/16/8/4 divided by it | paper's division | image | pixel | paper
    assert table_row(text, "4") == pytest.approx([8, 4, 2, 1, 16, 0.75, 0, 1, 0.65, 0, 1, 0.813])
    # R | max (—) | L | fused | fused with max (—) | pixel
    assert table_row(text, "DAAD+, `paper` **(default)**: rec norm, ali norm, weights 50 0.5 0.5") == \
        pytest.approx([0.95, 0, 1, 0.5, 0, 1, 0.95, 0, 1, 0.85, 0, 1])
    # L_rec, L_adv, L_ali, D loss, D accuracy, resets, shares at epoch 1, at the last epoch
    assert table_row(text, "`paper`") == pytest.approx([0.1, 1, 2, 0.5, 0.75, 0, 0.5, 0.25, 0.25, 0.5, 0.25, 0.25])
    assert table_row(text, "mean training image (no learning)") == pytest.approx([0.6, 0, 1, 0.5, 0, 1])
    assert "1 runs missing" not in text and "10 of 10 finished" in text
    assert table_row(text, "mean of 2 digits") == pytest.approx([0.6])
    # one seed a cell: no spread to judge a difference by (the 3-seed verdicts: the converged test)
    assert claim(text, "DAAD vs AE, image AUROC") == ("inconclusive", [0.9, 0.8])
    assert claim(text, "AE vs AE+Skip, pixel AUROC") == ("inconclusive", [0.7, 0.6])
    assert claim(text, "division 2 vs 1, image AUROC") == ("inconclusive", [0.9, 0.75])
    assert claim(text, "DAAD+ (fused, `paper` losses) vs DAAD, image AUROC") == ("inconclusive", [0.95, 0.9])
    assert claim(text, "DAAD vs the baseline, pixel AUROC") == ("inconclusive", [0.8, 0.5])
    for figure in ("score_distributions", "auroc_vs_block_size"):  # the third needs reconstructions
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 0


def test_a_converged_study_is_judged_by_the_smoothed_scores_and_shows_its_budget(tmp_path):
    write_quick_study(tmp_path, "tile128")
    text = open(build_tables("tile128", str(tmp_path))).read()
    # image A (R = mean) | A (R = max) | pixel raw | smoothed | AUPRO smoothed
    assert "| daad | 4 | 0.900 ± 0.000 (n=3) | 0.920 ± 0.000 (n=3) | 0.800 ± 0.000 (n=3) | 0.820 ± 0.000 (n=3) " \
           "| 0.720 ± 0.000 (n=3) |" in text
    # steps min-max | stopped at the plateau / at the limit | minutes | final validation error
    assert "| daad | 150-150 | 3 / 0 | 0 | 0.333 |" in text
    assert "| ae | 150-150 | 0 / 3 | 0 | 0.333 |" in text
    assert "at most 3000 steps, stopping earlier" in text
    assert claim(text, "DAAD vs AE, AUPRO") == ("held", [0.72, 0.62])
    assert claim(text, "DAAD vs AE, image AUROC (max of smoothed map)") == ("held", [0.92, 0.82])
    assert claim(text, "division 4 vs 1, smoothed pixel AUROC") == ("held", [0.82, 0.67])
    assert claim(text, "DAAD vs the baseline, AUPRO") == ("held", [0.72, 0.42])
    # division | block sizes | paper's division | image (max) | smoothed pixel | AUPRO | paper
    assert table_row(text, "8") == pytest.approx([8, 4, 2, 1, 16, 0.77, 0, 3, 0.67, 0, 3, 0.57, 0, 3, 0.813])
    assert (tmp_path / "figures" / "tile128_learning_curves.png").stat().st_size > 0


def test_the_ssim_study_says_how_it_trains_and_scores_and_shows_no_block_sizes(tmp_path):
    write_quick_study(tmp_path, "tile128-ssim")
    text = open(build_tables("tile128-ssim", str(tmp_path))).read()
    assert "19 of 19 finished" in text and "once the mean ssim map on 10%" in text
    assert "has not improved by 1% over 8 epochs (after 1000 steps at least)" in text
    assert "trained by the `ssim` reconstruction loss" in text and "scored by `ssim` maps, the mean image too" in text
    # DAAD+ is named by the reading it trained by, and each reading by the losses its runs trained by
    assert "DAAD+ in the ablation and the claims by the `ssim` reading" in text and "| daad+ (`ssim`) |" in text
    assert "| DAAD+, `paper` **(default)**: rec ssim, ali norm, weights 50 0.5 0.5 |" in text
    assert "| DAAD+, `ssim`: rec ssim, ali norm, weights 5000 0.5 0.5 |" in text
    assert "DAAD+ (fused, `ssim` losses) vs DAAD" in text and "DAAD+ (fused, `paper` losses) vs DAAD" in text
    for record in (tmp_path / "raw" / "tile128-ssim").glob("*-paper.*"):  # runs missing: the setting's L_rec
        record.unlink()
    text = open(build_tables("tile128-ssim", str(tmp_path))).read()
    assert "| DAAD+, `paper` **(default)**: rec ssim, ali norm, weights 50 0.5 0.5 | — |" in text
    assert "### Block size" not in text and "auroc_vs_block_size" not in text
    assert "3. An intermediate block size is best: **not tested**" in text
    assert claim(text, "DAAD vs AE, AUPRO") == ("held", [0.72, 0.62])
    assert (tmp_path / "figures" / "tile128-ssim_score_distributions.png").stat().st_size > 0
    assert not (tmp_path / "figures" / "tile128-ssim_auroc_vs_block_size.png").exists()


def test_a_setting_of_some_models_plans_tables_and_judges_those_alone(tmp_path):
    setting, long = SETTINGS["tile128-ssim"], SETTINGS["tile128-ssim-long"]
    assert [(r.model, r.seed) for r in plan(long)] == [(BASELINE, 0), ("daad", 0), ("ae", 0)]
    # the settings of the SSIM study's seed 0 but for the step limit
    for run in plan(long):
        short, longer = run_config(run, setting, ROOTS).to_dict(), run_config(run, long, ROOTS).to_dict()
        assert {k for k in short if short[k] != longer[k]} == {"steps"} and longer["steps"] == 6000
    with pytest.raises(ValueError, match=r"models \['vae'\] are not in the ablation"):
        replace(long, models=("ae", "vae"))
    write_quick_study(tmp_path, "tile128-ssim-long")
    text = open(build_tables("tile128-ssim-long", str(tmp_path))).read()
    section = text.split("(setting `tile128-ssim-long`)")[1]
    assert "3 of 3 finished" in section and "of the ablation's models only ae and daad" in section
    assert "at most 6000 steps" in section and "DAAD+ keeps" not in section
    assert [line.split(" |")[0] for line in section.splitlines() if line.startswith("| ")][:4] == [
        "| model", "| mean training image (no learning)", "| ae", "| daad"]
    assert "memae" not in section and "DAAD+" not in section and "### DAAD+ by loss reading" not in section
    for label in ("DAAD vs AE, AUPRO", "DAAD vs the baseline, AUPRO"):  # one seed: no spread to judge by
        assert claim(section, label)[0] == "inconclusive"
    assert "1. DAAD beats AE: DAAD vs AE" in section and "MemAE" not in section and "2. Skip" not in section
    assert (tmp_path / "figures" / "tile128-ssim-long_learning_curves.png").stat().st_size > 0


def test_the_converged_hazelnut_study_has_no_mnist_part(tmp_path):
    write_quick_study(tmp_path, "hazelnut128")
    text = open(build_tables("hazelnut128", str(tmp_path))).read()
    assert "## Hazelnut (setting `hazelnut128`)" in text and "MNIST" not in text
    assert "| daad | 150-150 | 3 / 0 | 0 | 0.333 |" in text and "over 100 epochs" in text
    assert claim(text, "DAAD vs AE, AUPRO") == ("held", [0.72, 0.62])
    for figure in ("learning_curves", "score_distributions", "auroc_vs_block_size"):
        assert (tmp_path / "figures" / f"hazelnut128_{figure}.png").stat().st_size > 0
        assert f"figures/hazelnut128_{figure}.png" in text


def test_compare_is_inconclusive_within_the_seed_spread():
    def records(*values, model="daad"):
        return [{"run": {"model": model}, "metrics": {"image_auroc": v}} for v in values]
    assert compare(records(0.9, 0.7), records(0.8, 0.8), "image_auroc")[0] == "inconclusive"
    assert compare(records(1.0), records(1.0), "image_auroc")[0] == "inconclusive"
    assert compare(records(0.7, 0.7), records(0.8, 0.79), "image_auroc")[0] == "did not hold"
    assert compare([], records(0.8), "image_auroc")[0].startswith("not tested")



def test_an_extreme_block_size_ahead_within_the_spread_leaves_the_claim_open():
    def records(*values):
        return [{"run": {"model": "daad"}, "metrics": {"image_auroc": v}} for v in values]

    def verdicts(blocks):
        summary = {"ablation": {m: [] for m in ("ae", "memae", "ae+skip", "daad", "daad+")},
                   "blocks": blocks, "readings": {}, "plus_reading": "paper"}
        (line,) = [c for c in claims(summary, (("image_auroc", "image AUROC"),)) if c.startswith("3.")]
        return line
    close = verdicts({1: records(0.567, 0.555, 0.58), 4: records(0.564, 0.56, 0.568), 8: records(0.55, 0.55)})
    assert "division 1, an extreme" in close and "division 4 vs 1, image AUROC: **inconclusive**" in close
    apart = verdicts({1: records(0.8, 0.81), 4: records(0.6, 0.61), 8: records(0.5, 0.51)})
    assert "division 4 vs 1, image AUROC: **did not hold**" in apart
    middle = verdicts({1: records(0.5, 0.51), 4: records(0.8, 0.81), 8: records(0.5, 0.51)})
    assert "division 4 vs 1, image AUROC: **held**" in middle and "division 4 vs 8, image AUROC: **held**" in middle

def test_compare_needs_the_seed_spread_of_each_seeded_side():
    def records(*values, model="daad"):
        return [{"run": {"model": model}, "metrics": {"image_auroc": v}} for v in values]
    assert compare(records(0.9), records(0.5), "image_auroc") == (
        "inconclusive", "0.900 vs 0.500, one run each: no seed spread to judge by")
    # Two seeds of one side say nothing of the other's spread...
    assert compare(records(0.7, 0.7), records(0.8), "image_auroc") == (
        "inconclusive", "0.700 vs 0.800, one run of one side: no seed spread to judge by")
    # ...but the no-learning baseline has no seed: its one run is exact.
    assert compare(records(0.7, 0.71), records(0.8, model=BASELINE), "image_auroc")[0] == "did not hold"
    assert compare(records(0.9), records(0.5, model=BASELINE), "image_auroc")[0] == "inconclusive"


def test_tables_only_needs_raw_runs(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no raw runs"):
        build_tables("full", str(tmp_path))
    # A study that has started (its logs) but finished no run: one line, and no empty section.
    (tmp_path / "started" / "raw" / "tile128" / "logs").mkdir(parents=True)
    with pytest.raises(SystemExit):
        reproduce.main(["--setting", "tile128", "--tables-only", "--out", str(tmp_path / "started")])
    assert "no raw runs in" in capsys.readouterr().err
    write_quick_study(tmp_path, "tile128")
    (tmp_path / "raw" / "tile256-tiled" / "logs").mkdir(parents=True)
    text = open(build_tables("tile128", str(tmp_path))).read()
    assert "setting `tile128`" in text and "tile256-tiled" not in text


def test_a_partial_study_says_what_is_missing(tmp_path):
    write_quick_study(tmp_path)
    (tmp_path / "raw" / "quick" / "mvtec-ae-div1-class0-seed0.json").unlink()
    text = open(build_tables("quick", str(tmp_path))).read()
    assert "9 of 10 finished" in text and "**Partial**: 1 runs missing" in text
    assert "`python -m models.reproduce --setting quick`" in text
    assert table_row(text, "ae") == [0.884]  # every measured cell empty ("—"), the paper's number left


def test_recorded_commands_hold_no_paths_of_the_machine():
    assert portable_command(["--setting", "tile", "--out", "/work/x/docs", "--data-root=/data"]) == \
        "python -m models.reproduce --setting tile --out PATH --data-root=PATH"


def test_finished_runs_are_never_repeated(tmp_path, capsys):
    write_quick_study(tmp_path)
    run_study("quick", str(tmp_path), {"mvtec": "unused", "mnist": "unused"}, jobs=1)
    assert "quick study: 10 runs, 10 already done" in capsys.readouterr().out
    meta = json.loads((tmp_path / "raw" / "quick" / "study.json").read_text())
    assert meta["wall_s"] >= 60.0 and meta["jobs"] == 1


def test_data_root_option_and_environment_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAAD_DATA_ROOT", str(tmp_path / "from-env"))
    with pytest.raises(SystemExit):
        reproduce.main(["--quick", "--out", str(tmp_path / "out")])
    message = capsys.readouterr().err
    assert f"data folder not found: {tmp_path / 'from-env' / 'mvtec_hazelnut_subset'}" in message
    assert "--data-root" in message and "DAAD_DATA_ROOT" in message
    with pytest.raises(SystemExit):
        reproduce.main(["--quick", "--data-root", str(tmp_path / "given"), "--out", str(tmp_path / "out")])
    assert f"data folder not found: {tmp_path / 'given' / 'mvtec_hazelnut_subset'}" in capsys.readouterr().err


@pytest.mark.usefixtures("single_thread")
def test_one_run_trains_scores_and_writes_its_record(hazelnut, tmp_path):
    setting = Setting(size=32, width=4, epochs=1, mnist_size=32, mnist_width=4, mnist_epochs=1,
                      digits=(), seeds=1, num_items=20)
    run = Run("mvtec", "daad+", division=2, seed=0, reading="ganomaly")
    record = execute(run, setting, {"mvtec": str(hazelnut)}, str(tmp_path))
    text = (tmp_path / f"{run.name}.json").read_text()
    saved = json.loads(text)
    assert saved["name"] == run.name and saved["metrics"] == record["metrics"]
    assert str(hazelnut) not in text and str(tmp_path) not in text  # no path of the machine
    assert saved["losses"] == {"rec_loss": "l1", "ali_loss": "mean_sq", "d_reset": 1e-5, "loss_weights": [50, 0.5, 1]}
    assert saved["lr"] == 2e-4
    assert record["epochs"] == 1 and [h["epoch"] for h in record["history"]] == [1]
    arrays = np.load(tmp_path / saved["arrays"])
    assert len(arrays["labels"]) == len(arrays["rec"]) == len(arrays["feat"]) == len(arrays["max"]) == 23
    assert len(arrays["train_rec"]) == len(arrays["train_feat"]) == 28
    metrics = record["metrics"]
    for key in ("image_auroc", "image_auroc_rec", "image_auroc_max", "image_auroc_feat", "image_auroc_fused_max",
                "pixel_auroc", "pixel_auroc_smoothed"):
        assert 0 <= metrics[key] <= 1, key
    assert record["figure"]["labels"] == [0, 1, 0, 1] and arrays["figure_reconstructions"].shape == (4, 32, 32, 3)
    assert '{"epoch": 1, "step": ' in (tmp_path / "logs" / f"{run.name}.log").read_text()


def test_a_run_cut_short_goes_on_from_its_last_epoch(hazelnut, tmp_path, monkeypatch):
    one = Setting(size=32, width=4, epochs=1, mnist_size=32, mnist_width=4, mnist_epochs=1, digits=(), seeds=1,
                  num_items=20)
    run = Run("mvtec", "daad", division=2, seed=0)
    with monkeypatch.context() as m:  # the first process ends after epoch 1, before it cleans up
        m.setattr("models.study.run.shutil.rmtree", lambda *args, **kwargs: None)
        first = execute(run, one, {"mvtec": str(hazelnut)}, str(tmp_path))
    work = tmp_path / "work" / run.name
    assert (work / "checkpoint.pt").exists()
    (tmp_path / f"{run.name}.json").unlink()
    record = execute(run, replace(one, epochs=2), {"mvtec": str(hazelnut)}, str(tmp_path))
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert record["history"][0] == first["history"][0]  # epoch 1 was not trained again
    assert record["train_s"] == pytest.approx(sum(h["time_s"] for h in record["history"]), abs=0.05)
    assert not work.exists()


def test_the_best_block_size_is_named_by_a_metric_that_differs_between_the_sizes():
    def records(image, pixel):
        return [{"run": {"model": "daad"}, "metrics": {"image_auroc": image, "pixel_auroc": p}} for p in pixel]
    summary = {"ablation": {m: [] for m in ("ae", "memae", "ae+skip", "daad", "daad+")}, "readings": {},
               "plus_reading": "paper",
               "blocks": {1: records(1.0, (0.80, 0.81)), 2: records(1.0, (0.90, 0.91)), 4: records(1.0, (0.85, 0.86))}}
    (line,) = [c for c in claims(summary, (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")))
               if c.startswith("3.")]
    assert line.startswith("3. An intermediate block size is best (division 2 has the highest mean pixel AUROC)")
    assert "division 2 vs 1, pixel AUROC: **held**" in line and "division 2 vs 1, image AUROC: **inconclusive**" in line


def test_a_study_at_chance_says_so_for_the_metrics_at_chance_only():
    def cells(**metrics):
        rs = [{"run": {"model": "daad"}, "metrics": metrics}]
        return {"ablation": {"daad": rs, "daad+": rs}, "readings": {"old": rs},
                "baseline": [{"run": {"model": "mean-image"}, "metrics": {k: 0.5 for k in metrics}}]}
    both = " ".join(near_chance(cells(image_auroc=0.55, pixel_auroc=0.57)))
    assert "by image AUROC, 0.55-0.55 (the mean training image, which learns nothing, scores 0.500) and by " \
           "pixel AUROC, 0.57-0.57" in both and "these metrics" in both
    assert near_chance(cells(image_auroc=0.9, pixel_auroc=0.9)) == []
    assert near_chance({"ablation": {}, "readings": {}}) == []
    # a converged study: the image AUROC at chance is named; the pixel AUROC above it and AUPRO are not
    one = " ".join(near_chance(cells(image_auroc_fused_max=0.56, pixel_auroc_smoothed=0.63, aupro_smoothed=0.3),
                               CONVERGED_KEYS))
    assert "by image AUROC (max of smoothed map), 0.56-0.56" in one and "this metric" in one
    assert "pixel" not in one and "AUPRO" not in one


def test_mnist_table_and_claims_compare_digit_by_digit():
    def rs(*values):
        return [{"run": {"model": "daad"}, "metrics": {"image_auroc": v}} for v in values]
    ae, daad, paper, old = ("ae", "", 0.0), ("daad", "", 0.0), ("daad+", "paper", 0.0), ("daad+", "old", 0.0)
    s = {"mnist": {ae: {0: rs(0.80, 0.81), 1: rs(0.80), 2: rs(0.6, 0.6)},
                   daad: {0: rs(0.90, 0.92), 1: rs(0.80, 0.82), 2: rs(0.5, 0.5)},
                   paper: {0: rs(0.95, 0.97), 1: rs(0.70, 0.72), 2: rs(0.5, 0.5)},
                   ("daad+", "paper", 1e-4): {0: rs(0.99), 1: rs(0.99), 2: rs(0.99)},
                   old: {0: [], 1: [], 2: []}}}
    text = "\n".join(mnist_table(s))
    assert text.splitlines()[0] == ("| normal digit | ae | daad | daad+ (`paper`) | daad+ (`paper`, lr 0.0001) "
                                    "| daad+ (`old`) |")
    assert table_row(text, "0") == pytest.approx([0.805, 0.007, 2, 0.91, 0.014, 2, 0.96, 0.014, 2, 0.99, 0, 1])
    assert "mean of" not in text  # no digit has every column yet: no means over different digits
    lines = mnist_claims(s)
    assert lines == ["- DAAD vs AE, image AUROC by digit: **did not hold** for [2]; **held** for [0]; "
                     "**inconclusive** for [1].",
                     "- DAAD+ (fused, `paper` losses) vs DAAD, image AUROC by digit: **did not hold** for [1]; "
                     "**held** for [0]; **inconclusive** for [2].",
                     "- DAAD+ (fused, `paper` losses, lr 0.0001) vs DAAD, image AUROC by digit: **inconclusive** for "
                     "[0, 1, 2]."]  # one run of lr 0.0001 a digit: its seed spread is unknown
    s["mnist"].pop(old)
    assert table_row("\n".join(mnist_table(s)), "mean of 3 digits") == \
        pytest.approx([0.735, 0.740, 0.723, 0.99], abs=1e-3)


def test_defect_types_and_their_aurocs(tmp_path):
    root = str(tmp_path)
    names = [f"{root}/good/a.png", f"{root}/MT_X/Imgs/b.png", f"{root}/MT_Y/Imgs/c.png", f"{root}/MT_X/Imgs/d.png"]
    types, kind = defect_types(names, np.array([0, 1, 1, 1]), root)
    assert types == ["MT_X/Imgs", "MT_Y/Imgs"] and kind.tolist() == [-1, 0, 1, 0]
    # normals 0.1 and 0.4; X scores 0.3 and 0.5 (AUROC 3/4 by hand), Y 0.05 (AUROC 0)
    write_npz(str(tmp_path / "r.npz"), defect_type=np.array([-1, -1, 0, 0, 1], np.int8),
                rec=np.array([0.1, 0.4, 0.3, 0.5, 0.05], np.float32))
    record = {"raw_dir": root, "arrays": "r.npz", "defect_types": ["MT_X/Imgs", "MT_Y/Imgs"]}
    aurocs = defect_type_aurocs([record, record, {"arrays": "old.npz"}], "rec")  # a run without types is left out
    assert aurocs == {"MT_X/Imgs": (0.75, 0.0, 2), "MT_Y/Imgs": (0.0, 0.0, 2)}


def test_the_baseline_scores_every_image_against_the_mean_training_image():
    train = [{"image": torch.full((3, 4, 4), v)} for v in (0.0, 0.5, 1.0)]
    baseline = fit_mean_image(train)
    x = torch.rand(2, 3, 4, 4)
    s = baseline.score(x)
    expected = (x - 0.5).pow(2).mean(dim=1)
    torch.testing.assert_close(s.error_map, expected)
    torch.testing.assert_close(s.rec, expected.flatten(1).mean(dim=1))
    assert s.feat is None and s.reconstruction.shape == x.shape


def test_the_baseline_run_trains_nothing(hazelnut, tmp_path):
    setting = Setting(size=32, width=4, epochs=1, mnist_size=32, mnist_width=4, mnist_epochs=1,
                      digits=(), seeds=1, num_items=20)
    record = execute(Run("mvtec", BASELINE, 1, 0), setting, {"mvtec": str(hazelnut)}, str(tmp_path))
    assert record["epochs"] == 0 and record["history"] == [] and "losses" not in record and "figure" not in record
    assert record["defect_types"] == ["test/colour"]
    assert 0 <= record["metrics"]["image_auroc"] <= 1 and 0 <= record["metrics"]["pixel_auroc"] <= 1
    arrays = np.load(tmp_path / record["arrays"])
    assert (arrays["defect_type"] >= 0).tolist() == arrays["labels"].astype(bool).tolist()


def test_records_made_before_a_run_field_existed_have_its_default():
    old = {"run": {"dataset": "mvtec", "model": "daad+", "division": 2, "seed": 0, "normal_class": 0}}
    assert select([old], model="daad+", reading="", lr=0.0) == [old]
    assert select([old], model="daad+", lr=1e-4) == []


def test_a_run_trains_at_its_learning_rate():
    setting, roots = SETTINGS["full"], {"mvtec": "unused"}
    assert run_config(Run("mvtec", "daad+", 2, 0, reading="paper", lr=1e-4), setting, roots).learning_rate == 1e-4
    assert run_config(Run("mvtec", "daad+", 2, 0, reading="paper"), setting, roots).learning_rate == 2e-4


@pytest.mark.usefixtures("single_thread")
def test_an_mnist_run_keeps_its_metrics_not_its_test_scores(mnist, tmp_path):
    setting = Setting(size=32, width=4, epochs=1, mnist_size=32, mnist_width=4, mnist_epochs=1,
                      digits=(1,), seeds=1, num_items=20)
    record = execute(Run("mnist", "daad", 1, 0, normal_class=1), setting, {"mnist": str(mnist)}, str(tmp_path))
    assert record["arrays"] is None and not list(tmp_path.glob("*.npz"))
    assert 0 <= record["metrics"]["image_auroc"] <= 1 and "defect_types" not in record
