"""Reproduce the paper's findings at laptop scale on real data: ``python -m models.reproduce``.

Runs, each for several seeds, with the ``models`` pipeline (fused CPU kernel where it exists):

* ablation (paper Table 3) on the MVTec AD hazelnut subset: AE, MemAE, AE+Skip, DAAD, DAAD+;
* block sizes (Table 4, Figure 5): DAAD with every division rate the input size allows;
* adversarial scores (Table 5): DAAD+ scored by R only, by L only, and by the fused score;
* DAAD+ under each reading of its losses (:data:`models.training.LOSS_READINGS`);
* MNIST one-class on the real test set (index split, see :mod:`models.data`): DAAD per digit;
* ``--setting tile``: the same ablation, block sizes and scores on the magnetic tile
  (``DATA_ROOT/magnetic_tile``: half of MT_Free trains, the other half and every defect test).

Every run writes one JSON file (metrics, every test image's scores, wall time) to
``OUT/raw/<setting>/``; a finished run is never repeated, so an interrupted study resumes where it
stopped. Then ``OUT/RESULTS.md`` and the figures in ``OUT/figures/`` are rebuilt from those files
alone (``--tables-only`` does just that). The data sets are looked for under ``--data-root``
(default: ``$DAAD_DATA_ROOT``, else ``../shared/data`` beside the checkout). The jobs live in
:mod:`models.study`.

Example:
    python -m models.reproduce --quick --jobs 2        # a reduced study, under 10 minutes
    python -m models.reproduce --jobs 2                # the full study, about 2 hours on 2 cores
    python -m models.reproduce --setting tile --jobs 1 # the magnetic tile, about 2 hours on 1 core
    python -m models.reproduce --tables-only           # rebuild docs/RESULTS.md from the raw runs
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from .cli import command_parser
from .data import DATA_ROOT_ENV, data_root
from .study.plan import SETTINGS
from .study.run import run_study
from .study.document import build_tables

REPO = Path(__file__).resolve().parent.parent
#: Folders of the data sets below the data root.
HAZELNUT, MNIST, TILE = "mvtec_hazelnut_subset", "mnist_t10k", "magnetic_tile"


def needs(setting: str) -> tuple[str, ...]:
    """The data sets a setting reads: its image data set, and MNIST where it has digits."""
    return (SETTINGS[setting].dataset,) + (("mnist",) if SETTINGS[setting].digits else ())


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = command_parser(__doc__, __package__, "reproduce")
    p.add_argument("--setting", choices=sorted(SETTINGS), default="full",
                   help="which study (default: full; see models/study/plan.py)")
    p.add_argument("--quick", action="store_true", help="the reduced study (under 10 minutes): --setting quick")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel, one core each (default: 2)")
    p.add_argument("--out", default=None,
                   help="output folder (default: docs/ for the full study, runs/reproduce-quick for --quick)")
    p.add_argument("--data-root", default=None,
                   help=f"folder holding {HAZELNUT}/, {MNIST}/ and {TILE}/ (default: ${DATA_ROOT_ENV}, else "
                        "../shared/data beside the checkout)")
    p.add_argument("--hazelnut", default=None, help=f"the hazelnut folder (default: DATA_ROOT/{HAZELNUT})")
    p.add_argument("--mnist", default=None, help=f"the MNIST IDX folder (default: DATA_ROOT/{MNIST})")
    p.add_argument("--tile", default=None, help=f"the magnetic tile folder (default: DATA_ROOT/{TILE})")
    p.add_argument("--tables-only", action="store_true", help="only rebuild RESULTS.md and figures")
    args = p.parse_args(argv)
    setting = "quick" if args.quick else args.setting
    out = args.out or str(REPO / ("runs/reproduce-quick" if setting == "quick" else "docs"))
    if not args.tables_only:
        root = Path(args.data_root) if args.data_root else data_root()
        roots = {"mvtec": args.hazelnut or str(root / HAZELNUT), "mnist": args.mnist or str(root / MNIST),
                 "tile": args.tile or str(root / TILE)}
        roots = {k: v for k, v in roots.items() if k in needs(setting)}
        for path in roots.values():
            if not os.path.isdir(path):
                folders = {"mvtec": HAZELNUT, "mnist": MNIST, "tile": TILE}
                p.error(f"data folder not found: {path} (give --data-root, or set {DATA_ROOT_ENV}, to the "
                        f"folder that holds {' and '.join(folders[k] + '/' for k in needs(setting))})")
        run_study(setting, out, roots, args.jobs)
    try:
        print("wrote", build_tables(setting, out))
    except FileNotFoundError as e:  # --tables-only before any run has finished
        p.error(str(e))


if __name__ == "__main__":
    main()
