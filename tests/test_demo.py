"""The offline demo end to end at toy size (no mAP target), its caching, and the narrow backbones."""

from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
import torch

from atssdet.config import BACKBONE_CHANNELS, DEMO_PRESETS, SHAPE_CLASSES
from atssdet.demo import CHECKPOINT_NAME, QUICK_PLAN, DemoPlan, checkpoint_matches, demo_config, run_demo
from atssdet.demo_plots import draw_enlarged, make_grid
from atssdet.evaluation.coco import STAT_NAMES
from atssdet.modeling.resnet import ResNet
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out, plan=QUICK_PLAN, device="cpu", threads=1, progress=False)


def test_demo_writes_every_output(demo_run) -> None:
    out, result = demo_run
    assert result.trained and result.train_seconds is not None
    assert not result.dataset.skipped
    # metrics JSON: the 12 COCO statistics, in [0, 1] or -1 (no objects of that size)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(STAT_NAMES) <= set(metrics["stats"]) and len(STAT_NAMES) == 12
    assert all(v == -1 or 0 <= v <= 1 for v in metrics["stats"].values())
    assert metrics["num_images"] == QUICK_PLAN.num_val
    assert metrics["iterations"] == 8
    # history: one loss per iteration, a validation every 3 iterations and at the end
    history = json.loads(result.history.read_text())
    assert history["iteration"] == list(range(1, 9))
    assert all(np.isfinite(history["total_loss"]))
    assert [e["iteration"] for e in history["evals"]] == [3, 6, 8]
    # plot and drawings are readable images of plausible size
    plot = cv2.imread(str(result.plot))
    assert plot is not None and plot.shape[0] > 300 and plot.shape[1] > 600
    assert len(result.predictions) == QUICK_PLAN.num_predict
    for path in [*result.predictions, result.grid]:
        image = cv2.imread(str(path))
        assert image is not None and min(image.shape[:2]) >= 384


def test_demo_checkpoint_loads_with_its_config(demo_run) -> None:
    out, result = demo_run
    from atssdet.loader import load

    model = load(weights=result.checkpoint)
    assert model.cfg == demo_config(QUICK_PLAN)
    assert model.cfg.class_names == SHAPE_CLASSES
    assert checkpoint_matches(result.checkpoint, demo_config(QUICK_PLAN))
    assert not checkpoint_matches(result.checkpoint, demo_config(dataclasses.replace(QUICK_PLAN, seed=1)))
    assert not checkpoint_matches(out / "missing.safetensors", demo_config(QUICK_PLAN))
    with torch.no_grad():
        output = model(torch.zeros(1, 3, 64, 64))
    assert output.cls_logits.shape[-1] == len(SHAPE_CLASSES)


def test_demo_rerun_reuses_data_and_model(demo_run) -> None:
    """A second run, through the CLI (``--quick`` is QUICK_PLAN), trains nothing and finds the same figures."""
    out, first = demo_run
    checkpoint = out / CHECKPOINT_NAME
    before = checkpoint.stat().st_mtime_ns
    again = run_cli(
        "demo", "--quick", "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress"
    )
    assert again.returncode == 0, again.stderr
    assert "training atss_demo_cpu" not in again.stdout
    assert "reusing the trained model" in again.stdout and "reusing the dataset" in again.stdout
    for name in ("checkpoint", "metrics", "plot", "detections"):
        assert f"{name} " in again.stdout
    assert checkpoint.stat().st_mtime_ns == before
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stats"] == pytest.approx(first.stats)  # same weights, same val images


def test_draw_enlarged_scales_boxes_with_the_image() -> None:
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    boxes = np.array([[10.0, 20.0, 50.0, 60.0]])
    drawn = draw_enlarged(image, boxes, np.array([0.9]), np.array([3]), SHAPE_CLASSES, min_side=400)
    assert drawn.shape == (400, 480, 3)  # enlarged 4x
    # the box outline lies on the scaled coordinates (40, 80)-(200, 240); its inside stays black
    assert drawn[160, 40].any() and drawn[160, 200].any() and drawn[240, 120].any()
    assert not drawn[160, 120].any()
    assert not image.any()  # input untouched


def test_make_grid_places_tiles() -> None:
    a = np.full((10, 20, 3), 1, dtype=np.uint8)
    b = np.full((12, 8, 3), 2, dtype=np.uint8)
    grid = make_grid([a, b, a], columns=2, pad=1)
    assert grid.shape == (1 + 2 * 13, 1 + 2 * 21, 3)
    assert (grid[1:11, 1:21] == 1).all() and (grid[1:13, 22:30] == 2).all() and (grid[14:24, 1:21] == 1).all()


@pytest.mark.parametrize("arch", ["resnet18_w32", "resnet18_w16"])
def test_narrow_resnet_channels_and_names(arch: str) -> None:
    narrow = ResNet(arch, norm="BN", freeze_at=0)
    full = ResNet("resnet18", norm="BN", freeze_at=0)
    assert list(narrow.state_dict()) == list(full.state_dict())  # same checkpoint key names
    feats = narrow(torch.zeros(1, 3, 64, 64))
    assert tuple(feats[k].shape[1] for k in ("res3", "res4", "res5")) == BACKBONE_CHANNELS[arch]
    assert feats["res5"].shape[-2:] == (2, 2)


def test_demo_preset_and_plan_checks() -> None:
    cfg = DEMO_PRESETS["atss_demo_cpu"]
    assert cfg.class_names == SHAPE_CLASSES and cfg.backbone_freeze_at == 0 and cfg.backbone_norm == "BN"
    assert cfg.fpn_in_channels == BACKBONE_CHANNELS[cfg.backbone]
    with pytest.raises(ValueError, match="unknown demo model"):
        demo_config(QUICK_PLAN, model="nope")
    plan = DemoPlan(
        num_train=4, num_val=2, image_size=(64, 64), seed=0, batch_size=2, eval_every=1, num_predict=1
    )
    assert demo_config(plan).extra["demo"]["image_size"] == [64, 64]


def test_cosine_schedule_and_adamw_for_the_demo_preset() -> None:
    """The trainer options the preset relies on: cosine lr after a linear warm-up, and AdamW."""
    import math

    from atssdet.config import PRESETS, with_overrides
    from atssdet.training.schedule import build_optimizer, learning_rate, total_iterations

    cfg = DEMO_PRESETS["atss_demo_cpu"]
    assert (cfg.optimizer, cfg.lr_schedule) == ("AdamW", "cosine")
    assert total_iterations(cfg, 8) == 2000
    base = cfg.basic_lr * 8
    assert learning_rate(cfg, 1000, global_batch=8) == pytest.approx(base / 2)
    assert learning_rate(cfg, 49, global_batch=8) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * 49 / 2000)) * 50 / 100
    )
    assert learning_rate(cfg, 1500, global_batch=8) == pytest.approx(
        base * 0.5 * (1 + math.cos(0.75 * math.pi))
    )
    assert learning_rate(cfg, 1999, global_batch=8) < base * 1e-5
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer(cfg, params, lr=0.1), torch.optim.AdamW)
    zoo = PRESETS["atss_res18_coco_3x_800size"]
    assert (zoo.optimizer, zoo.lr_schedule) == ("SGD", "step")
    assert isinstance(build_optimizer(zoo, params, lr=0.1), torch.optim.SGD)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(with_overrides(zoo, {"optimizer": "Adam"}), params, lr=0.1)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        learning_rate(with_overrides(zoo, {"lr_schedule": "poly"}), 0, global_batch=8)


def test_run_demo_restores_the_thread_count(demo_run) -> None:
    """``threads=1`` applies to the demo only; the calling process keeps its own setting."""
    out, _ = demo_run
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = run_demo(out, plan=QUICK_PLAN, device="cpu", threads=1, progress=False)  # reuses the model
        assert not again.trained
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_demo_killed_during_training_continues_to_the_same_result(demo_run, tmp_path) -> None:
    """Issue 14 acceptance 5: the quick demo SIGKILLed during training (after its checkpoint at 3)
    and re-run continues from that checkpoint and ends with the uninterrupted run's metrics, model
    and history."""
    import os
    import subprocess
    import sys

    from atssdet.convert import load_safetensors
    from atssdet.demo import TRAIN_DIR
    from tests.conftest import REPO_ROOT
    from tests.helpers import sigkill_when

    _, reference = demo_run
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    args = ["demo", "--quick", "--out", str(out), "--device", "cpu", "--threads", "1", "--no-progress"]
    # rank 0 (the only process) stalls before its 5th iteration: after the checkpoint of iteration 3
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tests" / "faulty_cli.py"), "stall_rank=0:4", *args],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    log = out / TRAIN_DIR / "train_log.jsonl"
    # iteration 4 done: the process stalls at the 5th
    sigkill_when(proc, lambda: 4 in _logged_iterations(log), "iteration 4")
    assert not (out / CHECKPOINT_NAME).exists() and (out / TRAIN_DIR / "iter_00000003.pt").is_file()

    again = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing the interrupted training" in again.stdout and "from scratch" not in again.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    want = json.loads(reference.metrics.read_text())
    for key in ("stats", "per_class_ap", "num_images", "num_detections", "iterations"):
        assert metrics[key] == want[key], key
    got_weights, _ = load_safetensors(out / CHECKPOINT_NAME)
    ref_weights, _ = load_safetensors(reference.checkpoint)
    assert all(torch.equal(got_weights[k], ref_weights[k]) for k in ref_weights)
    history, ref_history = (
        json.loads((out / "history.json").read_text()),
        json.loads(reference.history.read_text()),
    )
    for key in ("iteration", "lr", "total_loss", "evals"):
        assert history[key] == ref_history[key], key


def _logged_iterations(log) -> set[int]:
    """Iterations whose losses ``train_log.jsonl`` holds (nothing while it does not exist)."""
    if not log.is_file():
        return set()
    found = set()
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "total_loss" in record:
            found.add(record["iteration"])
    return found
