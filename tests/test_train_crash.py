"""Crash safety: SIGKILL during a checkpoint write leaves the previous checkpoint intact and
``--resume auto`` continues from it with the losses of an uninterrupted run (issue 8, acceptance 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import sigkill_when
from tests.test_train import TINY_OVERRIDES, loss_rows, make_dataset, run_tiny

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sigkill_during_checkpoint_write_then_resume_auto(tmp_path):
    from atssdet.training.checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint

    ds = make_dataset(tmp_path / "synth", num_train=4, num_val=0)
    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    sets = [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "tests" / "faulty_cli.py"),
            # the checkpoint of iteration 4 sleeps 120 s between writing its temp file and the rename
            "slow_checkpoint=4:120",
            "train",
            "--model",
            "atss_res18_coco_3x_800size",
            "--data",
            str(ds.train_ann),
            "--images",
            str(ds.train_images),
            "--out",
            str(out),
            "--max-iters",
            "6",
            "--checkpoint-every",
            "2",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--no-progress",
            "--log-every",
            "1",
            *sets,
        ],  # fmt: skip
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The temp file is fully written and fsynced when it appears; the rename has not happened yet.
    sigkill_when(
        proc, lambda: any(out.glob(".iter_00000004.pt.*.tmp")), "the checkpoint write of iteration 4"
    )

    # The previous checkpoint is intact and the newest; last.pt still points at it.
    assert [p.name for p in list_checkpoints(out)] == ["iter_00000002.pt"]
    assert load_checkpoint(out / "iter_00000002.pt")["iteration"] == 2
    assert (out / "last.pt").samefile(out / "iter_00000002.pt")
    assert find_resume_checkpoint(out) == (out / "iter_00000002.pt", [])
    logged = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    killed_losses = {r["iteration"]: r["total_loss"] for r in logged if "total_loss" in r}
    assert sorted(killed_losses) == [1, 2, 3, 4]

    resumed = run_tiny(ds, out, max_iters=6, checkpoint_every=2, resume="auto")
    assert not any(out.glob(".*.tmp"))  # the killed run's temp file was cleaned up
    assert resumed.start_iteration == 2
    reference = run_tiny(ds, tmp_path / "reference", max_iters=6, checkpoint_every=2)
    ref = loss_rows(reference)
    got = loss_rows(resumed)
    assert sorted(got) == [3, 4, 5, 6]
    for it, values in got.items():
        assert values == pytest.approx(ref[it], rel=1e-6, abs=0), it  # bitwise in practice
    for it, total in killed_losses.items():  # the killed subprocess computed the same losses too
        assert total == pytest.approx(ref[it][0], rel=1e-6, abs=0), it
    assert [p.name for p in list_checkpoints(out)] == [f"iter_{i:08d}.pt" for i in (6, 4, 2)]
