"""Distributed training on CPU with gloo: 2 ranks x batch 1 == 1 process x batch 2; a dead rank ends the job.

Same global batch: with every image in one aspect-ratio group and an even image count, rank r of 2
takes positions r, r + 2, ... of each epoch's permutation, so the ranks' batches k together are the
single process's batch k (same images, same augmentation seeds). All images have the same size, so
padding is the same too; the backbone uses GroupNorm (no batch statistics); ``atss_loss`` divides
by the rank-averaged num_fg / sum of centerness and DDP averages the gradients, which together equal
the single-process normalisation. The logged loss is the all-reduced mean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from tests.coco_synth import _torchrun_env, free_port
from tests.test_train import TINY_CFG, TINY_OVERRIDES, make_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
ITERS = 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_worker(
    rank: int, world_size: int, port: int, root: str, out: str, result_file: str, resume: str | None = None
) -> None:
    """Spawned rank: join gloo as torchrun would, train to ITERS with batch 1 (from ``resume`` if given,
    allowing another layout), save the losses."""
    _torchrun_env(rank, world_size, port)
    torch.set_num_threads(1)
    from atssdet import distributed
    from atssdet.training import train

    root_path = Path(root)
    try:
        result = train(
            TINY_CFG,
            train_ann=root_path / "annotations" / "instances_train.json",
            train_images=root_path / "train",
            out_dir=out,
            val_ann=root_path / "annotations" / "instances_val.json",
            val_images=root_path / "val",
            batch_size=1,
            max_iters=ITERS,
            checkpoint_every=2,
            num_workers=0,
            progress=False,
            log_every=1,
            device="cpu",
            dist_timeout=60,
            resume=resume,
            allow_layout_change=resume is not None,
        )
        Path(f"{result_file}.{rank}").write_text(json.dumps({"losses": result.losses, "evals": result.evals}))
    finally:
        distributed.cleanup()


def test_two_gloo_ranks_give_the_single_process_losses(tmp_path):
    """Acceptance 5.2 (training half): 2 processes x batch 1 vs 1 process x batch 2, 4 iterations:
    the same loss sequence (within 1e-5 relative), the same lr, and the same trained weights."""
    from atssdet.training import train
    from atssdet.training.checkpoint import load_checkpoint

    ds = make_dataset(tmp_path / "synth", num_train=8, num_val=3)
    single = train(
        TINY_CFG, train_ann=ds.train_ann, train_images=ds.train_images, out_dir=tmp_path / "single",
        batch_size=2, max_iters=ITERS, checkpoint_every=2, num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    result_file = str(tmp_path / "losses")
    tmp.spawn(
        train_worker,
        args=(2, free_port(), str(ds.root), str(tmp_path / "dist"), result_file),
        nprocs=2,
        join=True,
    )
    per_rank = [json.loads(Path(f"{result_file}.{r}").read_text()) for r in range(2)]
    assert per_rank[0]["losses"] == per_rank[1]["losses"]  # every rank logs the all-reduced mean
    dist_losses = per_rank[0]["losses"]
    # Validation of the DDP model at the end: images sharded over the ranks, every rank gets the report.
    assert per_rank[0]["evals"] == per_rank[1]["evals"]
    assert [e["iteration"] for e in per_rank[0]["evals"]] == [ITERS]
    metrics = json.loads((tmp_path / "dist" / "eval" / f"iter_{ITERS:08d}.metrics.json").read_text())
    assert metrics["num_images"] == 3
    assert [r["iteration"] for r in dist_losses] == list(range(1, ITERS + 1))
    for d, s in zip(dist_losses, single.losses, strict=True):
        assert d["lr"] == s["lr"]
        for key in ("total_loss", "loss_cls", "loss_bbox", "loss_ctr"):
            assert d[key] == pytest.approx(s[key], rel=1e-5), (d["iteration"], key, d[key], s[key])
    print("single:", [round(s["total_loss"], 6) for s in single.losses])
    print("2 rank:", [round(d["total_loss"], 6) for d in dist_losses])

    # Only rank 0 wrote files: one start event, one record per iteration.
    lines = [json.loads(line) for line in (tmp_path / "dist" / "train_log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines].count("start") == 1
    assert [r["iteration"] for r in lines if "total_loss" in r] == list(range(1, ITERS + 1))
    a = load_checkpoint(tmp_path / "dist" / f"iter_{ITERS:08d}.pt")
    b = load_checkpoint(tmp_path / "single" / f"iter_{ITERS:08d}.pt")
    assert a["world_size"] == 2 and a["batch_size"] == 1 and len(a["rng"]) == 2
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=1e-3, atol=5e-5)  # float32 sum order

    # Moving the single-process run (1 x 2) at iteration 2 onto 2 ranks x 1 (--allow-layout-change):
    # same global batch, so it continues at iteration 2 with the same lr, and here the same data stream,
    # i.e. the single process's iterations 3 and 4.
    tmp.spawn(
        train_worker,
        args=(2, free_port(), str(ds.root), str(tmp_path / "moved"), f"{result_file}.moved",
              str(tmp_path / "single" / "iter_00000002.pt")),
        nprocs=2,
        join=True,
    )  # fmt: skip
    moved = json.loads(Path(f"{result_file}.moved.0").read_text())["losses"]
    assert [r["iteration"] for r in moved] == [3, 4]
    for d, s in zip(moved, single.losses[2:], strict=True):
        assert d["lr"] == s["lr"]
        for key in ("total_loss", "loss_cls", "loss_bbox", "loss_ctr"):
            assert d[key] == pytest.approx(s[key], rel=1e-5), (d["iteration"], key, d[key], s[key])


def _torchrun_train(root: Path, out: Path, fault: str, timeout: float) -> tuple[int, str, float]:
    """``atssdet train`` on 2 gloo ranks under torchrun with ``fault`` injected (tests/faulty_cli.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    sets = [arg for key, value in TINY_OVERRIDES.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO_ROOT / "tests" / "faulty_cli.py"), fault, "train", "--model", "atss_res18_coco_3x_800size", "--data", str(root),
        "--out", str(out), "--batch-size", "1", "--max-iters", "50", "--workers", "0", "--device", "cpu",
        "--no-progress", "--dist-timeout", "5", *sets,
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_stuck_or_killed_rank_ends_the_job_with_a_clear_message(tmp_path):
    """Acceptance 5.3: under torchrun, rank 1 stops responding at iteration 3 -> rank 0's collective
    times out after --dist-timeout 5 s and the job fails naming the problem (no hang); rank 1
    SIGKILLed -> the job fails at once, torchrun naming the killed rank."""
    ds = make_dataset(tmp_path / "synth", num_train=4, num_val=0)

    code, output, elapsed = _torchrun_train(ds.root, tmp_path / "stuck", "stall_rank=1:2", timeout=240)
    print(f"stuck rank: exit {code} after {elapsed:.1f} s")
    assert code != 0
    assert "atssdet train: error: rank 0 of 2:" in output, output[-3000:]
    assert "another rank probably exited or is stuck (collective timeout 5 s)" in output

    code, output, elapsed = _torchrun_train(ds.root, tmp_path / "killed", "kill_rank=1:2", timeout=240)
    print(f"killed rank: exit {code} after {elapsed:.1f} s")
    assert code != 0
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]
