"""Distributed evaluation on CPU with gloo: 2 processes give the single-process numbers; dead ranks fail fast."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

from atssdet import distributed
from atssdet.evaluation import evaluate
from atssdet.evaluation.coco import STAT_NAMES, coco_stats
from tests.coco_synth import (
    IMAGES,
    TINY_CFG,
    assert_same_detections,
    eval_worker,
    fake_detector,
    free_port,
    timeout_worker,
    write_split,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_shard_counts_every_item_once():
    items = list(range(5))
    shards = [distributed.shard(items, rank=r, world_size=2) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    for world in (1, 2, 3, 7):
        parts = [distributed.shard(list(range(11)), rank=r, world_size=world) for r in range(world)]
        assert sorted(i for p in parts for i in p) == list(range(11))


def test_single_process_helpers_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_distributed(device="cpu")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object(3) == 3 and distributed.is_main_process()
    distributed.barrier()
    distributed.cleanup()


def test_two_gloo_processes_equal_one_process_then_dead_rank_fails(tmp_path):
    """Acceptance 2 (eval half): 2 ranks, 5 images (odd): same 12 stats and the same results file as 1 process.

    Then rank 1 exits without leaving the group: rank 0's next collective raises DistributedError
    naming the rank and the cause instead of hanging.
    """
    ann_file, image_dir = write_split(tmp_path)
    single = evaluate(
        fake_detector, ann_file, image_dir, batch_size=2, out=tmp_path / "single.json", progress=False
    )
    result_file = str(tmp_path / "report")
    tmp.spawn(
        eval_worker,
        args=(2, free_port(), str(ann_file), str(image_dir), str(tmp_path / "dist.json"), result_file),
        nprocs=2,
        join=True,
    )
    reports = [json.loads(Path(f"{result_file}.{r}").read_text()) for r in range(2)]
    for report in reports:  # every rank returns rank 0's report
        assert report["num_images"] == len(IMAGES) and report["failed_images"] == []
        assert [report["stats"][n] for n in STAT_NAMES] == [single.stats[n] for n in STAT_NAMES]
        assert report["num_detections"] == single.num_detections
    dist_results = json.loads((tmp_path / "dist.json").read_text())
    assert dist_results == json.loads((tmp_path / "single.json").read_text())
    per_image = {r["image_id"] for r in dist_results}
    assert per_image == {i[1] for i in IMAGES}
    assert 0.0 < single.stats["AP"] < 1.0

    outcome = json.loads(Path(f"{result_file}.after_exit").read_text())
    assert outcome["type"] == "DistributedError", outcome["error"]
    assert (
        "rank 0 of 2: all_gather_object failed; another rank probably exited or is stuck" in outcome["error"]
    )
    print(f"exit: rank 0 failed after {outcome['elapsed_s']:.2f} s: {outcome['error'][:300]}")


def _torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_torchrun_cli_eval_matches_single_process(tmp_path):
    """`torchrun --nproc_per_node=2 -m atssdet eval` with a real (tiny) ATSS checkpoint: same detections and stats."""
    from atssdet.convert import save_safetensors
    from atssdet.modeling.atss import build_model

    ann_file, image_dir = write_split(tmp_path)
    torch.manual_seed(0)
    model = build_model(TINY_CFG).eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(0.0)
    weights = save_safetensors(model.state_dict(), tmp_path / "tiny.safetensors", cfg=TINY_CFG)
    # One thread (autouse fixture): the same CPU kernels as the torchrun workers (OMP_NUM_THREADS=1).
    single = evaluate(model, ann_file, image_dir, batch_size=1, out=tmp_path / "single.json", progress=False)

    proc = _torchrun(
        "-m", "atssdet", "eval", "--weights", str(weights), "--data", str(ann_file), "--images", str(image_dir),
        "--out", str(tmp_path / "dist" / "{name}.results.json"), "--device", "cpu", "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("AR100 =") == 1  # only rank 0 prints
    assert "2 process(es)" in proc.stdout and f"{len(IMAGES)} images" in proc.stdout
    dist_results = json.loads((tmp_path / "dist" / "tiny.results.json").read_text())
    single_results = json.loads((tmp_path / "single.json").read_text())
    assert len(single_results) > 50
    assert_same_detections(dist_results, single_results)  # bitwise equal here; allow kernel rounding
    metrics = json.loads((tmp_path / "dist" / "tiny.metrics.json").read_text())
    assert metrics["num_images"] == len(IMAGES)
    assert metrics["stats"] == pytest.approx(single.stats, abs=1e-6)
    assert metrics["stats"] == coco_stats(ann_file, tmp_path / "dist" / "tiny.results.json")


def test_stuck_rank_fails_within_timeout(tmp_path):
    """A rank that hangs (alive, never joins the collective) makes rank 0 fail after the group timeout."""
    ctx = multiprocessing.get_context("spawn")
    port, timeout = free_port(), 3.0
    result_file = tmp_path / "outcome.json"
    procs = [
        ctx.Process(target=timeout_worker, args=(rank, 2, port, timeout, str(result_file)))
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=90)
        assert not procs[0].is_alive(), "rank 0 still waiting: the collective timeout did not fire"
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
    outcome = json.loads(result_file.read_text())
    assert outcome["type"] == "DistributedError", outcome["error"]
    assert (
        "rank 0 of 2: all_gather_object failed; another rank probably exited or is stuck" in outcome["error"]
    )
    assert "collective timeout 3 s" in outcome["error"]
    print(f"hang: rank 0 failed after {outcome['elapsed_s']:.2f} s: {outcome['error'][:300]}")
