"""The trainer: MegEngine schedule, loss falls, exact stop/resume, fine-tuning, backbone init, NaN stop, bad images.

Everything runs on CPU with one thread on a tiny res18 config (64 px images, thin FPN/head, GN
backbone from scratch) over a few synthetic images written by the test.
"""

from __future__ import annotations

import collections
import json
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import atssdet.training.step as step_mod
from atssdet.config import PRESETS, ATSSConfig, with_overrides
from atssdet.criterion import LOSS_KEYS
from atssdet.data.check import DatasetCheckError
from atssdet.data.coco import COCODetection
from atssdet.data.sampler import GroupedBatchSampler
from atssdet.data.synth import generate_synthetic_dataset
from atssdet.modeling.atss import build_model
from atssdet.training import TrainingError, TrainResult, train
from atssdet.training.checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint
from atssdet.training.schedule import learning_rate, total_iterations
from atssdet.training.weights import load_backbone_weights, load_finetune_weights
from tests.conftest import R18, run_cli

# Everything that makes the model small and fast; the recipe fields stay MegEngine's except the
# warm-up (5 iterations) and the lr (0.01 per image: the tiny model tolerates it and learns fast).
TINY_OVERRIDES: dict[str, Any] = {
    "train_image_short_size": [64],
    "train_image_max_size": 64,
    "test_image_short_size": 64,
    "test_image_max_size": 64,
    "fpn_out_channels": 32,
    "fpn_top_in_channel": 32,
    "head_num_convs": 1,
    "head_norm_groups": 8,
    "backbone_norm": "GN",
    "backbone_freeze_at": 0,
    "warm_iters": 5,
    "basic_lr": 0.01,
}
TINY_CFG = with_overrides(PRESETS[R18], TINY_OVERRIDES)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_dataset(root: Path, *, num_train: int = 4, num_val: int = 2) -> Any:
    """Synthetic square 64 px shapes dataset (6 classes) under ``root``."""
    return generate_synthetic_dataset(
        root, num_train=num_train, num_val=num_val, image_size=(64, 64), progress=False, log=lambda m: None
    )


def run_tiny(ds: Any, out: Path, **kwargs: Any) -> TrainResult:
    options: dict[str, Any] = dict(batch_size=2, num_workers=0, progress=False, log_every=1, device="cpu")
    options.update(kwargs)
    return train(TINY_CFG, train_ann=ds.train_ann, train_images=ds.train_images, out_dir=out, **options)


def loss_rows(result: TrainResult) -> dict[int, list[float]]:
    return {r["iteration"]: [r[k] for k in LOSS_KEYS] for r in result.losses}


class _PatchedLoss:
    """Wraps ``atss_loss``: on call ``at`` (1-based) raise ``exc`` or return NaN losses."""

    def __init__(self, *, at: int, exc: BaseException | None = None, nan: bool = False) -> None:
        self.at, self.exc, self.nan, self.calls = at, exc, nan, 0
        self.real = step_mod.atss_loss

    def __call__(self, output: Any, targets: Any, cfg: ATSSConfig) -> dict[str, torch.Tensor]:
        self.calls += 1
        losses = self.real(output, targets, cfg)
        if self.calls == self.at:
            if self.exc is not None:
                raise self.exc
            if self.nan:
                losses["loss_bbox"] = losses["loss_bbox"] * float("nan")
                losses["total_loss"] = losses["loss_cls"] + losses["loss_bbox"] + losses["loss_ctr"]
        return losses


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_dataset(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def reference_run(dataset: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, Path]:
    """An uninterrupted 50-iteration run with checkpoints every 10 iterations and validation every 25."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    result = run_tiny(
        dataset, out, max_iters=50, checkpoint_every=10, val_ann=dataset.val_ann,
        val_images=dataset.val_images, eval_every=25,
    )  # fmt: skip
    return result, out


def test_learning_rate_schedule_matches_megengine():
    """MegEngine train.py: lr = 0.01/16 per image x global batch, (step+1)/500 warm-up, x0.1 at epochs 42 and 50."""
    cfg = PRESETS["atss_res50_coco_3x_800size"]
    per_epoch = 80000 // 16
    assert total_iterations(cfg, 16) == 54 * per_epoch == 270000
    assert learning_rate(cfg, 0, global_batch=16) == pytest.approx(0.01 / 500)
    assert learning_rate(cfg, 249, global_batch=16) == pytest.approx(0.01 * 250 / 500)
    assert learning_rate(cfg, 500, global_batch=16) == pytest.approx(0.01)
    assert learning_rate(cfg, 42 * per_epoch - 1, global_batch=16) == pytest.approx(0.01)
    assert learning_rate(cfg, 42 * per_epoch, global_batch=16) == pytest.approx(0.001)
    assert learning_rate(cfg, 50 * per_epoch, global_batch=16) == pytest.approx(0.0001)
    assert learning_rate(cfg, 600, global_batch=8) == pytest.approx(0.005)  # scales with the global batch
    x101 = PRESETS["atss_resx101_coco_2x_800size"]
    assert learning_rate(x101, 24 * per_epoch, global_batch=16) == pytest.approx(0.001)
    assert total_iterations(x101, 16) == 36 * per_epoch


def test_loss_falls_by_half_and_files_are_written(reference_run):
    """Acceptance 4.3: the tiny model's loss falls to at most half on the synthetic set; logs and weights exist."""
    result, out = reference_run
    totals = [r["total_loss"] for r in result.losses]
    assert len(totals) == 50 and all(math.isfinite(t) for t in totals)
    first, last = float(np.mean(totals[:3])), float(np.mean(totals[-5:]))
    print(f"loss {first:.3f} -> {last:.3f} (ratio {last / first:.2f})")
    assert last <= 0.5 * first

    # Checkpoints every 10 iterations, last.pt is the newest (same file), final weights loadable.
    assert [p.name for p in list_checkpoints(out)] == [f"iter_{i:08d}.pt" for i in (50, 40, 30, 20, 10)]
    assert (out / "last.pt").samefile(out / "iter_00000050.pt")
    state = load_checkpoint(out / "iter_00000020.pt")
    assert state["iteration"] == 20 and state["world_size"] == 1 and state["batch_size"] == 2
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    assert set(state["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert ATSSConfig.from_json(state["config"]).class_names == dataset_classes()
    from atssdet.loader import load

    model = load(weights=out / "model_final.safetensors")  # what `eval/predict --weights` do
    assert model.cfg.num_classes == 6
    final = load_checkpoint(out / "iter_00000050.pt")["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, final[key]), key

    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "total_loss" in r]
    assert [r["iteration"] for r in steps] == list(range(1, 51))
    assert {"lr", "time", "data_time", "eta", "max_mem_mb", "loss_cls", "loss_bbox", "loss_ctr"} <= set(
        steps[0]
    )
    assert steps[-1]["total_loss"] == totals[-1]
    assert [r["event"] for r in lines if "event" in r].count("checkpoint") == 5

    # Periodic validation (COCO mAP of the in-memory model) at 25 and at the end.
    assert [e["iteration"] for e in result.evals] == [25, 50]
    evals = [r for r in lines if r.get("event") == "eval"]
    assert [r["iteration"] for r in evals] == [25, 50]
    assert all(0.0 <= r["bbox/AP"] <= 1.0 or r["bbox/AP"] == -1.0 for r in evals)
    assert (out / "eval" / "iter_00000050.results.json").is_file()
    assert (out / "eval" / "iter_00000050.metrics.json").is_file()


def dataset_classes() -> tuple[str, ...]:
    from atssdet.data.synth import SHAPE_CLASSES

    return tuple(SHAPE_CLASSES)


def test_interrupted_run_resumes_with_identical_losses(dataset, reference_run, tmp_path, monkeypatch):
    """Acceptance 4.3: training dies at iteration 13 (after the checkpoint at 10); --resume auto continues
    from 10 and iterations 11..20 have exactly the losses of the uninterrupted run."""
    reference, _ = reference_run
    out = tmp_path / "run"
    monkeypatch.setattr(step_mod, "atss_loss", _PatchedLoss(at=13, exc=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_tiny(dataset, out, max_iters=50, checkpoint_every=10)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(out)] == ["iter_00000010.pt"]

    resumed = run_tiny(dataset, out, max_iters=20, checkpoint_every=10, resume="auto")
    assert resumed.start_iteration == 10 and resumed.iteration == 20
    ref = loss_rows(reference)
    got = loss_rows(resumed)
    assert sorted(got) == list(range(11, 21))
    for it, values in got.items():
        assert values == ref[it], (it, values, ref[it])  # bitwise: same kernels, same data, same state
    assert [r["lr"] for r in resumed.losses] == [r["lr"] for r in reference.losses[10:20]]


def test_nan_loss_stops_naming_iteration_and_images(dataset, tmp_path, monkeypatch):
    """A NaN loss at iteration 5 stops training with the iteration and the batch's image ids; the
    checkpoint of iteration 4 stays the newest and intact."""
    out = tmp_path / "run"
    monkeypatch.setattr(step_mod, "atss_loss", _PatchedLoss(at=5, nan=True))
    with pytest.raises(TrainingError) as info:
        run_tiny(dataset, out, max_iters=8, checkpoint_every=2)
    message = str(info.value)
    # The batch of iteration 5 from the same sampler the trainer uses.
    ds = COCODetection(dataset.train_ann, dataset.train_images, remove_images_without_annotations=True)
    batches = iter(GroupedBatchSampler(ds.aspect_ratios(), 2, seed=0, rank=0, world_size=1))
    for _ in range(4):
        next(batches)
    ids = sorted(ds.image_ids[i] for i, _ in next(batches))
    assert "non-finite loss at iteration 5 (" in message
    assert "loss_bbox=nan" in message
    assert f"image ids {ids}" in message
    assert "iter_00000004.pt is untouched" in message
    assert [p.name for p in list_checkpoints(out)] == ["iter_00000004.pt", "iter_00000002.pt"]
    state = load_checkpoint(out / "iter_00000004.pt")
    assert state["iteration"] == 4
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values() if v.is_floating_point())
    assert (out / "last.pt").samefile(out / "iter_00000004.pt")
    assert not (out / "model_final.safetensors").exists()


def test_unreadable_images_are_skipped_counted_and_limited(tmp_path):
    """A corrupt image is skipped and reported; with --max-bad-images 0 training stops naming the limit."""
    ds = make_dataset(tmp_path / "synth", num_train=4, num_val=0)
    bad = sorted(Path(ds.train_images).iterdir())[1]
    bad.write_bytes(b"not an image")
    # The start-up check refuses it (fatal: unreadable image) and names the file ...
    with pytest.raises(DatasetCheckError, match=bad.name):
        run_tiny(ds, tmp_path / "checked", max_iters=4, checkpoint_every=100)
    assert not (tmp_path / "checked" / "last.pt").exists()
    # ... and an image that breaks after the check (data_check="quick" only sees that it exists) is skipped.
    result = run_tiny(ds, tmp_path / "ok", max_iters=4, checkpoint_every=100, data_check="quick")
    assert result.iteration == 4 and result.skipped_images
    assert all(bad.name in s for s in result.skipped_images)
    with pytest.raises(TrainingError, match="more than the limit of 0"):
        run_tiny(ds, tmp_path / "stop", max_iters=4, checkpoint_every=100, max_bad_images=0, data_check="off")


def test_amp_needs_cuda(dataset, tmp_path):
    with pytest.raises(ValueError, match="--amp needs a CUDA device"):
        run_tiny(dataset, tmp_path, max_iters=1, amp=True)


def test_backbone_init_from_torchvision_pth_and_megengine_pkl(tmp_path):
    """ImageNet classification weights (torchvision .pth, MegEngine .pkl with (1,C,1,1) BN params) -> backbone, fc dropped."""
    import torchvision

    cfg = with_overrides(PRESETS[R18], {"backbone_norm": "FrozenBN"})
    torch.manual_seed(1)
    classifier = torchvision.models.resnet18()
    for m in classifier.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    tv_state = classifier.state_dict()
    torch.save(tv_state, tmp_path / "resnet18.pth")
    mge: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for key, value in tv_state.items():
        if key.endswith("num_batches_tracked"):
            continue
        array = value.numpy().astype(np.float32)
        if ".bn" in key or key.startswith("bn1") or ".downsample.1." in key:
            array = array.reshape(1, -1, 1, 1)  # MegEngine BatchNorm layout
        mge[key] = array
    (tmp_path / "resnet18.pkl").write_bytes(pickle.dumps(mge, protocol=4))

    for path in (tmp_path / "resnet18.pth", tmp_path / "resnet18.pkl"):
        model = build_model(cfg)
        load_backbone_weights(model, path)
        got = model.backbone.bottom_up.state_dict()
        for key, value in got.items():
            assert torch.equal(value, tv_state[key].to(value.dtype)), (path.suffix, key)
    from atssdet.convert import CheckpointError

    with pytest.raises(CheckpointError, match="unexpected key"):  # a GN backbone cannot take BN weights
        load_backbone_weights(build_model(TINY_CFG), tmp_path / "resnet18.pth")


def test_finetune_zoo_checkpoint_onto_three_classes(r18_checkpoint, tmp_path):
    """Acceptance 4.4: the res18 zoo-format .pkl onto a 3-class dataset via the CLI: no key errors, a
    3-output classifier with the prior bias, every other tensor from the checkpoint."""
    from atssdet.convert import load_megengine_pickle, load_safetensors, megengine_to_torch
    from tests.coco_synth import write_split

    ann_file, image_dir = write_split(tmp_path / "three")
    cfg3 = with_overrides(PRESETS[R18], {"num_classes": 3, "class_names": ["bird", "cat", "dog"]})
    model = build_model(cfg3)
    load_finetune_weights(model, r18_checkpoint)
    full = build_model(PRESETS[R18])
    reference = megengine_to_torch(load_megengine_pickle(r18_checkpoint), full)
    for key, value in model.state_dict().items():
        if key.startswith("head.cls_score."):
            continue
        assert torch.equal(value, reference[key]), key
    assert model.head.cls_score.weight.shape == (3, 256, 3, 3)
    assert torch.allclose(model.head.cls_score.bias, torch.full((3,), -math.log(99.0)))

    proc = run_cli(
        "train", "--model", R18, "--finetune", str(r18_checkpoint), "--data", str(ann_file),
        "--images", str(image_dir), "--out", str(tmp_path / "ft"), "--max-iters", "1", "--batch-size", "1",
        "--workers", "0", "--device", "cpu", "--no-progress",
        "--set", "train_image_short_size=[64]", "--set", "train_image_max_size=96",
        env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final weights" in proc.stdout
    tensors, saved_cfg = load_safetensors(tmp_path / "ft" / "model_final.safetensors")
    assert saved_cfg is not None and saved_cfg.num_classes == 3
    assert saved_cfg.class_names == ("cat", "dog", "bird")  # sorted category ids 3, 7, 12
    assert tensors["head.cls_score.weight"].shape == (3, 256, 3, 3)
    # conv1 + layer1 are frozen (backbone_freeze_at=2): exactly the checkpoint's after a step.
    for key in ("backbone.bottom_up.conv1.weight", "backbone.bottom_up.layer1.0.conv1.weight"):
        assert torch.equal(tensors[key], reference[key]), key
    assert not torch.equal(tensors["head.bbox_pred.weight"], reference["head.bbox_pred.weight"])  # trained


def test_resume_auto_skips_corrupt_newest(dataset, reference_run, tmp_path):
    """A truncated newest checkpoint is passed over (with the reason) for the previous one."""
    import shutil

    _, ref_out = reference_run
    for it in (10, 20):
        shutil.copy(ref_out / f"iter_{it:08d}.pt", tmp_path / f"iter_{it:08d}.pt")
    data = (tmp_path / "iter_00000020.pt").read_bytes()
    (tmp_path / "iter_00000030.pt").write_bytes(data[: len(data) // 2])
    found, reasons = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "iter_00000020.pt"
    assert len(reasons) == 1 and "iter_00000030.pt: corrupt or truncated checkpoint" in reasons[0]


def test_cli_train_rejects_bad_data_arguments(tmp_path, capsys):
    from atssdet.cli import main

    assert main(["train", "--data", str(tmp_path / "nothing.json"), "--out", str(tmp_path / "o")]) == 2
    assert "atssdet train: error: --data" in capsys.readouterr().err
    (tmp_path / "ann.json").write_text("{}")
    assert main(["train", "--data", str(tmp_path / "ann.json"), "--out", str(tmp_path / "o")]) == 2
    assert "give its image folder too" in capsys.readouterr().err


def test_resume_refuses_another_layout_or_config(dataset, reference_run, tmp_path):
    """Resuming with another processes x batch layout or another config would not continue the same
    run: refused, naming the difference."""
    _, ref_out = reference_run
    ckpt = ref_out / "iter_00000010.pt"
    with pytest.raises(
        ValueError,
        match=r"1 process\(es\) x batch 2; resume with the same layout \(now 1 x 1\).*--allow-layout-change",
    ):
        run_tiny(dataset, tmp_path / "a", batch_size=1, max_iters=12, resume=ckpt)
    other = with_overrides(TINY_CFG, {"head_num_convs": 2})
    with pytest.raises(ValueError, match="head_num_convs: checkpoint 1, now 2"):
        train(other, train_ann=dataset.train_ann, train_images=dataset.train_images, out_dir=tmp_path / "b",
              max_iters=12, resume=ckpt, num_workers=0, progress=False, device="cpu")  # fmt: skip


def test_resume_after_set_log_interval_continues_but_not_after_a_recipe_change(
    dataset, reference_run, tmp_path
):
    """Resume compares what changes the model, the data or the recipe: ``--set log_interval=5`` (and a
    test-time field) may change and the run continues with the uninterrupted run's losses; a changed
    ``basic_lr`` or ``backbone`` is refused, naming the field."""
    reference, ref_out = reference_run
    ckpt = ref_out / "iter_00000010.pt"
    relaxed = with_overrides(TINY_CFG, {"log_interval": 5, "test_nms": 0.5})
    out = tmp_path / "run"
    result = train(
        relaxed, train_ann=dataset.train_ann, train_images=dataset.train_images, out_dir=out, batch_size=2,
        max_iters=16, checkpoint_every=100, resume=ckpt, num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    assert result.start_iteration == 10 and result.iteration == 16
    ref = loss_rows(reference)
    assert loss_rows(result) == {it: ref[it] for it in range(11, 17)}
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines if "total_loss" in r] == [11, 15, 16]  # first, every 5th, last
    assert ATSSConfig.from_json(load_checkpoint(out / "iter_00000016.pt")["config"]).log_interval == 5
    for key, value in (("basic_lr", 0.02), ("backbone", "resnet34")):
        other = with_overrides(TINY_CFG, {key: value})
        with pytest.raises(ValueError, match=f"another config; differences:\n  {key}: checkpoint"):
            train(other, train_ann=dataset.train_ann, train_images=dataset.train_images, out_dir=tmp_path / key,
                  max_iters=12, resume=ckpt, num_workers=0, progress=False, device="cpu")  # fmt: skip


def test_resume_from_a_checkpoint_that_carries_removed_config_fields(dataset, reference_run, tmp_path):
    """A checkpoint written before the unread MegEngine fields were removed still resumes."""
    reference, ref_out = reference_run
    state = load_checkpoint(ref_out / "iter_00000010.pt")
    old_config = json.loads(state["config"])
    old_config.update({"fpn_top_in_feature": "p5", "in_features": ["p3", "p4", "p5", "p6", "p7"]})
    old_config.update({"backbone_pretrained": False, "num_anchors": 1, "class_aware_box": False})
    state["config"] = json.dumps(old_config)
    torch.save(state, tmp_path / "iter_00000010.pt")
    result = run_tiny(dataset, tmp_path, max_iters=11, checkpoint_every=100, resume="auto")
    assert result.start_iteration == 10
    assert loss_rows(result) == {11: loss_rows(reference)[11]}


def test_resume_with_another_layout_when_allowed(dataset, reference_run, tmp_path, capsys):
    """E.g. 8 GPUs -> 4: on request the run continues at the same number of images seen, with the
    learning rate of the new global batch (here 1 x 2 at iteration 10 -> 1 x 1 at iteration 20)."""
    _, ref_out = reference_run
    out = tmp_path / "run"
    result = run_tiny(
        dataset,
        out,
        batch_size=1,
        max_iters=23,
        resume=ref_out / "iter_00000010.pt",
        allow_layout_change=True,
    )
    assert (
        "trained as 1 x 2 (iteration 10, 20 images); continuing as 1 x 1 at iteration 20"
        in capsys.readouterr().err
    )
    assert result.start_iteration == 20 and result.iteration == 23
    assert [r["iteration"] for r in result.losses] == [21, 22, 23]
    for row in result.losses:
        assert math.isfinite(row["total_loss"])
        assert row["lr"] == pytest.approx(learning_rate(result.config, row["iteration"] - 1, global_batch=1))
    start = json.loads((out / "train_log.jsonl").read_text().splitlines()[0])
    assert start["global_batch"] == 1
    assert start["resumed_layout"] == {"world_size": 1, "batch_size": 2, "iteration": 10}
    # The new run's checkpoints are in the new layout: resuming them needs no flag.
    again = run_tiny(dataset, out, batch_size=1, max_iters=24, resume="auto")
    assert again.start_iteration == 23 and [r["iteration"] for r in again.losses] == [24]
    # A larger global batch continues at a lower iteration number: refused in a folder that already
    # holds later checkpoints (--resume auto and keep_checkpoints sort by iteration number).
    before = sorted(p.name for p in ref_out.iterdir())
    with pytest.raises(
        ValueError, match=r"holds checkpoints past iteration 5 .*iter_00000010\.pt.*--out NEW_DIR"
    ):
        run_tiny(dataset, ref_out, batch_size=4, max_iters=8, resume=ref_out / "iter_00000010.pt",
                 allow_layout_change=True)  # fmt: skip
    assert sorted(p.name for p in ref_out.iterdir()) == before


def test_keep_checkpoints_prunes_old_files(dataset, tmp_path):
    result = run_tiny(dataset, tmp_path, max_iters=4, checkpoint_every=1, keep_checkpoints=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_00000004.pt", "iter_00000003.pt"]
    assert (tmp_path / "last.pt").samefile(tmp_path / "iter_00000004.pt") and result.iteration == 4
