"""Every benchmark script starts as documented (``python benchmarks/NAME.py``): imports resolve, --help works.

The benchmarks themselves are too slow for the suite; this catches the scripts rotting (a broken
import went unnoticed once: bench_train_step.py only ran with the package on PYTHONPATH).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = sorted(p.name for p in (REPO_ROOT / "benchmarks").glob("bench_*.py"))


def test_benchmarks_found() -> None:
    assert len(SCRIPTS) >= 8, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script: str, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # as a user runs it
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
