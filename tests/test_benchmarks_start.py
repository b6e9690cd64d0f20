"""Every benchmark script starts as documented (``python benchmarks/NAME.py``): imports resolve, --help works.

The benchmarks themselves are too slow for the suite; this catches the scripts rotting (a broken
import went unnoticed once: bench_train_step.py only ran with the package on PYTHONPATH).

One interpreter runs every script's ``--help`` in turn (torch is imported once, not 13 times: 70 s ->
under 15 s), each as ``python benchmarks/NAME.py`` would: ``sys.path`` as that command sets it
(the script's folder first, no PYTHONPATH) and atssdet/benchmarks imported afresh, so a script
that only imports with the package already on the path still fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = sorted(p.name for p in (REPO_ROOT / "benchmarks").glob("bench_*.py"))

_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, traceback
import torch  # noqa: F401  (shared by every script; what they would each import first)

base = [p for p in sys.path if p not in ("", os.getcwd())]
results = {}
for script in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(script), *base]
    for name in [m for m in sys.modules if m.split(".")[0] in ("atssdet", "benchmarks")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    results[os.path.basename(script)] = [code, out.getvalue(), err.getvalue()]
sys.__stdout__.write("\nRESULTS " + json.dumps(results) + "\n")
"""


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, list]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER, *(str(REPO_ROOT / "benchmarks" / s) for s in SCRIPTS)],
        cwd=tmp_path_factory.mktemp("bench_help"),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.rsplit("\nRESULTS ", 1)[1])


def test_benchmarks_found() -> None:
    assert len(SCRIPTS) >= 8, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str, help_runs: dict[str, list]) -> None:
    code, out, err = help_runs[script]
    assert code == 0, err[-2000:]
    assert "usage:" in out
