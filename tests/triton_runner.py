"""Runs the Triton interpreter cases (tests/triton_cases.py) in a process of their own.

Triton's interpreter must be on (``TRITON_INTERPRET=1``) before the kernels are defined, that is
before ``daad_ext`` is imported, which a pytest process has usually done already; so
tests/test_triton.py runs the cases here, in a subprocess with the GPU hidden
(:func:`run_in_subprocess`), and reports each case's result as a test of its own. By hand::

    TRITON_INTERPRET=1 python tests/triton_runner.py OUT.json [NAME ...]

writes ``{name: {"ok", "error", "seconds"}}`` for the named cases (all by default) to OUT.json.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Iterable, Optional

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def run_cases(names: Iterable[str]) -> dict[str, dict]:
    """Runs the named cases in this process; {name: {"ok", "error", "seconds"}}."""
    from triton_cases import CASES
    results = {}
    for name in names:
        start = time.perf_counter()
        try:
            CASES[name]()
            results[name] = {"ok": True, "error": ""}
        except BaseException:  # noqa: BLE001  (report every failure, keep going)
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 3)
    return results


def run_in_subprocess(names: Optional[list[str]] = None, timeout: float = 1200) -> dict[str, dict]:
    """Runs the cases (all by default) in an interpreted subprocess with the GPU hidden; their
    results, or a RuntimeError with the subprocess's output if it wrote none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), out, *(names or [])],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(out):
            raise RuntimeError(f"interpreter subprocess failed (rc={proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        with open(out) as f:
            return json.load(f)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0].startswith("-"):
        print(__doc__)
        return 2
    # This checkout's daad_ext (not an installed one), imported by the cases only from here on.
    sys.path[:0] = [ROOT, TESTS]
    from daad_ext.triton import INTERPRETED
    if not INTERPRETED:
        print("set TRITON_INTERPRET=1 to run the interpreter cases", file=sys.stderr)
        return 2
    from triton_cases import CASES
    outcome = run_cases(argv[1:] or list(CASES))
    with open(argv[0], "w") as f:
        json.dump(outcome, f, indent=1)
    failed = [name for name, result in outcome.items() if not result["ok"]]
    print(f"{len(outcome) - len(failed)} passed, {len(failed)} failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
