"""The console commands of ``pip install ".[models]"``: daad-train, daad-evaluate, daad-predict,
daad-export, daad-calibrate, daad-reproduce (each the ``main`` of ``python -m models.<command>``, whose result a
console script must not return as its exit status), and the parser every command starts from."""
from __future__ import annotations

import argparse
import re

from .inference import DEFAULT_IMAGE_SCORE, IMAGE_SCORES
from .networks.acceleration import SpeedOptions

#: The package's name once installed (setup.py); ``models`` in a checkout.
INSTALLED_PACKAGE = "daad_models"


def program(package: str, command: str) -> str:
    """How a user runs ``command``: ``daad-<command>`` once installed, ``python -m models.<command>``
    in a checkout (the installed package has no ``models``)."""
    return f"daad-{command}" if package == INSTALLED_PACKAGE else f"python -m models.{command}"


def command_parser(doc: str, package: str, command: str, **options) -> argparse.ArgumentParser:
    """The parser of a command whose module docstring is ``doc``: its first paragraph the
    description, the rest the epilog, every example naming the command as the user runs it."""
    def rename(text: str) -> str:
        return re.sub(r"python -m models\.(\w+)", lambda m: program(package, m.group(1)), text)

    summary, examples = doc.split("\n\n", 1)
    return argparse.ArgumentParser(prog=program(package, command), description=rename(summary),
                                   epilog=rename(examples), formatter_class=argparse.RawDescriptionHelpFormatter,
                                   **options)



def train() -> None:
    from .train import main
    main()


def evaluate() -> None:
    from .evaluate import main
    main()


def predict() -> None:
    from .predict import main
    main()


def export() -> None:
    from .export import main
    main()


def calibrate() -> None:
    from .calibrate import main
    main()


def add_image_score_option(parser: argparse.ArgumentParser, exports: bool = False) -> None:
    """The commands' ``--image-score``: which R the score A(x) fuses (models/inference/scorer.py);
    ``exports``: the command also runs exports, scored as they were exported (default None)."""
    default = f"{DEFAULT_IMAGE_SCORE}; an export's: the one it was exported with" if exports else DEFAULT_IMAGE_SCORE
    parser.add_argument("--image-score", choices=IMAGE_SCORES, default=None if exports else DEFAULT_IMAGE_SCORE,
                        help="R of the image score: max of the anomaly map smoothed by a Gaussian (anomalib's; "
                             f"small defects) or its mean (the paper's) (default: {default})")


def add_speed_option(parser: argparse.ArgumentParser, fast: SpeedOptions, note: str = "") -> None:
    """The commands' ``--no-fast``: the plain eager float32 model instead of ``fast``
    (models/networks/acceleration.py), described from ``fast`` itself; ``note`` adds what the
    command's default keeps."""
    parts = [f"{fast.describe()}, measured the fastest by benchmarks/detector.py", note,
             "freed memory kept: glibc's malloc reuses it instead of mapping it afresh, process-wide"
             if fast.keep_freed_memory else ""]
    parser.add_argument("--no-fast", action="store_true",
                        help="run the plain eager float32 model on glibc's malloc as it is "
                             f"(default: {'; '.join(part for part in parts if part)})")


def reproduce() -> None:
    from .reproduce import main
    main()
