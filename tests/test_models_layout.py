"""models/: the rooms import only from the rooms before them, and every file stays readable in one
sitting (about 300 lines at most)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1] / "models"
#: Each room's rank: a module may import from rooms of a lower rank (and its own room) only.
#: The top-level modules of models/ are the commands, above everything.
RANKS = {"data": 0, "networks": 0, "training": 1, "inference": 2, "study": 3, "": 4}
MAX_LINES = 300


def room_of(path: Path) -> str:
    parts = path.relative_to(MODELS).parts
    return parts[0] if len(parts) > 1 else ""


def imported_rooms(path: Path) -> set[str]:
    """The rooms of models/ that ``path`` imports from (relative or absolute imports)."""
    rooms = set()
    package = path.relative_to(MODELS).parent.parts
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = package[:len(package) - (node.level - 1)]
                target = list(base) + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "models":
                target = node.module.split(".")[1:]
            else:
                continue
            rooms.add(target[0] if target and target[0] in RANKS else "")
    return rooms


FILES = sorted(MODELS.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(MODELS)))
def test_no_import_runs_back_up(path):
    own = room_of(path)
    upward = {room for room in imported_rooms(path) if room != own and RANKS[room] >= RANKS[own]}
    assert not upward, f"models/{path.relative_to(MODELS)} ({own or 'commands'}) imports from {sorted(upward)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(MODELS)))
def test_no_file_is_too_long(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    room = tmp_path / "data"
    room.mkdir()
    bad = room / "bad.py"
    bad.write_text("from ..training import TrainConfig\nfrom . import images\n")
    monkeypatch.setattr(sys.modules[__name__], "MODELS", tmp_path)
    assert imported_rooms(bad) == {"training", "data"}
