"""``benchmarks/gpu_check.sh`` on a machine without CUDA: runs its CPU parts, says the CUDA parts were
skipped, writes its JSON and exits 0 (issue 18, item 2). About 15 s here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REFERENCE_DIR, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check runs its GPU parts (minutes)"),
]


def test_gpu_check_runs_its_cpu_parts_and_skips_the_cuda_ones(tmp_path):
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "ATSSDET_REFERENCE_DIR": str(REFERENCE_DIR),
        "WORK": str(tmp_path / "work"),
    }
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CUDA is not available here: skipped" in done.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["cuda"] is False and "benchmark" in report["skipped"]
    assert {name: s["rc"] for name, s in report["steps"].items()} == {
        "environment": 0, "cuda_tests": 0, "benchmark_smoke": 0,
    }  # fmt: skip
    bench = report["gpu_bench"]
    assert bench["environment"]["smoke"] and bench["benchmark"] and not bench["skipped"]
    assert {(r["model"], r["mode"]) for r in bench["benchmark"]} == {
        ("atss_r50", "inference"), ("fcos_r50", "inference"), ("atss_r50", "train"),
    }  # fmt: skip
    if REFERENCE_DIR.is_dir():
        assert bench["parity"]["fp32"]["small"]["detections_match"] is True
