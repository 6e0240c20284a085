"""Which of the paper's claims held: verdicts of mean and spread over seeds, rebuilt from the raw
run records alone (:mod:`.aggregate`)."""
from __future__ import annotations

from typing import Any

from .aggregate import metric
from .plan import BASELINE


def plus_label(reading: str, lr: float = 0.0) -> str:
    """DAAD+ trained under ``reading`` at learning rate ``lr`` (0: the default), in the claims."""
    return f"DAAD+ (fused, `{reading}` losses" + (f", lr {lr:g}" if lr else "") + ")"


def compare(better: list[dict[str, Any]], worse: list[dict[str, Any]], key: str) -> tuple[str, str]:
    """Verdict on "``better`` scores above ``worse``" by ``key``, and the numbers behind it.

    Inconclusive when either side is missing, when a side trained from a seed has one run only
    (its seed spread is unknown: a second side's spread says nothing about it; the no-learning
    baseline has no seed, so its one run is exact), or when the means differ by no more than the
    larger standard deviation over seeds (equal means included, as when both are at the ceiling
    of 1).
    """
    a, b = metric(better, key), metric(worse, key)
    if a is None or b is None:
        return "not tested (runs missing)", ""
    numbers = f"{a[0]:.3f} vs {b[0]:.3f}"
    unspread = [n for n, runs in ((a[2], better), (b[2], worse)) if n < 2 and not seedless(runs)]
    if unspread:
        return "inconclusive", numbers + (", one run each" if len(unspread) == 2 else ", one run of one side") \
            + ": no seed spread to judge by"
    if abs(a[0] - b[0]) <= max(a[1], b[1]) or a[0] == b[0]:
        return "inconclusive", numbers + ", within the seed spread"
    return ("held" if a[0] > b[0] else "did not hold"), numbers


def seedless(runs: list[dict[str, Any]]) -> bool:
    """Whether ``runs`` are of the no-learning baseline, which has no seed (one run is all)."""
    return all(r["run"]["model"] == BASELINE for r in runs)


#: The metrics each claim is judged by: (metric, name). The first studies read the paper's image
#: score (A with R = mean) and raw pixel maps; the converged ones the smoothed maximum, the
#: smoothed maps and AUPRO (issue 21: the score that works, and where the defect is).
PAPER_KEYS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"))
CONVERGED_KEYS = (("image_auroc_fused_max", "image AUROC (max of smoothed map)"),
                  ("pixel_auroc_smoothed", "smoothed pixel AUROC"), ("aupro_smoothed", "AUPRO"))


def claim(title: str, pairs: list[tuple[str, list, list]], keys: tuple = PAPER_KEYS) -> str:
    parts = []
    for label, better, worse in pairs:
        for key, what in keys:
            verdict, numbers = compare(better, worse, key)
            parts.append(f"{label}, {what}: **{verdict}**" + (f" ({numbers})" if numbers else ""))
    return f"{title}: " + "; ".join(parts) + "."


def ranking_key(blocks: dict[int, list[dict[str, Any]]], keys: tuple) -> tuple[str, str]:
    """The first (metric, name) of ``keys`` whose means differ between the block sizes: a saturated
    metric (image AUROC 1.000 at every size on the hazelnut subset) cannot say which is best."""
    for key, what in keys:
        means = [m[0] for rs in blocks.values() if (m := metric(rs, key))]
        if len(means) == len(blocks) and len(set(means)) > 1:
            return key, what
    return keys[0]


def claims(s: dict[str, Any], keys: tuple = PAPER_KEYS) -> list[str]:
    """Plain statements of which of the paper's claims held, by each metric of ``keys``."""
    ab = s["ablation"]  # the models the setting trains: a claim is made where both its sides trained
    blocks = {r: rs for r, rs in s["blocks"].items() if rs}
    lines = []
    if rivals := [(m, name) for m, name in (("ae", "AE"), ("memae", "MemAE")) if "daad" in ab and m in ab]:
        lines.append(claim("1. DAAD beats " + " and ".join(name for _, name in rivals),
                           [(f"DAAD vs {name}", ab["daad"], ab[m]) for m, name in rivals], keys))
    if "ae" in ab and "ae+skip" in ab:
        lines.append(claim("2. Skip connections alone hurt", [("AE vs AE+Skip", ab["ae"], ab["ae+skip"])], keys))
    if len(blocks) >= 3:
        key, what = ranking_key(blocks, keys)
        means = {r: metric(rs, key)[0] for r, rs in blocks.items()}
        extremes = (min(blocks), max(blocks))
        middle = max((r for r in blocks if r not in extremes), key=means.get)
        extreme = max(extremes, key=means.get)
        if means[extreme] > means[middle]:  # the best intermediate size against it, with the spread
            lines.append(claim(f"3. An intermediate block size is best (division {extreme}, an extreme, has "
                               f"the highest mean {what}; the best intermediate is division {middle})",
                               [(f"division {middle} vs {extreme}", blocks[middle], blocks[extreme])], keys))
        else:  # a tie goes to the intermediate size
            lines.append(claim(f"3. An intermediate block size is best (division {middle} has the "
                               f"highest mean {what})",
                               [(f"division {middle} vs {r}", blocks[middle], blocks[r]) for r in extremes], keys))
    else:
        lines.append("3. An intermediate block size is best: **not tested** (fewer than three block sizes).")
    plus = s["plus_reading"]
    if "daad" in ab and "daad+" in ab:
        pairs = [(f"{plus_label(plus)} vs DAAD", ab["daad+"], ab["daad"])]
        pairs += [(f"{plus_label(plus, lr)} vs DAAD", rs, ab["daad"]) for lr, rs in s.get("lrs", {}).items()]
        pairs += [(f"{plus_label(r)} vs DAAD", rs, ab["daad"]) for r, rs in s["readings"].items() if r != plus]
        lines.append(claim("4. The adversarial representation adds to DAAD", pairs, keys))
    learners = (("daad", "DAAD vs the baseline"), ("daad+", f"{plus_label(plus)} vs the baseline"))
    # not a claim of the paper: whether the data set can show any of the above
    if s.get("baseline") and (pairs := [(label, ab[m], s["baseline"]) for m, label in learners if m in ab]):
        lines.append(claim("5. The models learn more than the mean training image (the no-learning baseline)",
                           pairs, keys))
    return lines


def mnist_claims(s: dict[str, Any]) -> list[str]:
    """The paper's claims on MNIST, digit by digit (the seed spread of each digit decides)."""
    columns = s["mnist"]
    ae, memae, skip, daad = (("ae", "", 0.0), ("memae", "", 0.0), ("ae+skip", "", 0.0), ("daad", "", 0.0))
    pairs = [("DAAD vs AE", daad, ae), ("DAAD vs MemAE", daad, memae), ("AE vs AE+Skip", ae, skip),
             ("DAAD vs AE+Skip (the memories on the skip connections)", daad, skip)]
    pairs += [(f"{plus_label(c[1], c[2])} vs DAAD", c, daad) for c in columns if c[0] == "daad+"]
    lines = []
    for label, better, worse in pairs:
        if better not in columns or worse not in columns:
            continue
        verdicts: dict[str, list[int]] = {}
        for d, rs in columns[better].items():
            if rs and columns[worse][d]:
                verdicts.setdefault(compare(rs, columns[worse][d], "image_auroc")[0], []).append(d)
        if verdicts:
            lines.append(f"- {label}, image AUROC by digit: "
                         + "; ".join(f"**{v}** for {digits}" for v, digits in sorted(verdicts.items())) + ".")
    return lines


def near_chance(s: dict[str, Any], keys: tuple = PAPER_KEYS, ceiling: float = 0.6) -> list[str]:
    """A warning naming each AUROC of ``keys`` by which every model is close to chance: the data set
    then cannot tell the models apart by it at this scale, whatever its verdicts below say. AUPRO is
    not judged (its chance level is not 0.5 but about the smallest false positive rate it integrates)."""
    runs = [*s["ablation"].values(), *s["readings"].values()]
    flagged = []
    for key, what in (k for k in keys if not k[0].startswith("aupro")):
        means = [m[0] for rs in runs if (m := metric(rs, key))]
        if not means or max(means) >= ceiling:
            continue
        base = metric(s.get("baseline", []), key)
        who = "it" if flagged else "the mean training image, which learns nothing,"
        flagged.append(f"{what}, {min(means):.2f}-{max(means):.2f}" + (f" ({who} scores {base[0]:.3f})" if base else ""))
    if not flagged:
        return []
    return ["Every model's mean is close to chance here by " + " and by ".join(flagged) + ": at this input "
            "size and training budget the data set does not tell the models apart by "
            + ("these metrics" if len(flagged) > 1 else "this metric") + ", so those verdicts below compare noise.", ""]
