"""`atssdet --help` and flag errors answer without importing torch (7 s of CPU before a word, otherwise)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

HEAVY = ("torch", "cv2", "numpy", "pycocotools")


def _imported_heavy_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run ``python -X importtime -m atssdet ARGS``; return the process and the heavy modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "atssdet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    lines = [
        line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
    ]
    return proc, sorted({name.split(".")[0] for name in lines} & set(HEAVY))


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("predict", "--help"),
        ("train", "--help"),
        ("data", "check", "--help"),
        ("predict",),
        ("eval", "--bogus"),
    ],
    ids=["help", "predict-help", "train-help", "data-check-help", "missing-argument", "unknown-flag"],
)
def test_help_and_flag_errors_import_no_heavy_module(args):
    proc, heavy = _imported_heavy_modules(*args)
    assert proc.returncode in (0, 2), proc.stderr[-2000:]
    assert "usage: atssdet" in proc.stdout + proc.stderr
    assert heavy == [], f"`atssdet {' '.join(args)}` imported {heavy}"


def test_the_check_sees_a_heavy_import():
    """The same measurement reports torch once a command really runs (so the test above can fail)."""
    proc, heavy = _imported_heavy_modules("predict", "missing.jpg", "--weights", "missing.safetensors")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "torch" in heavy
