"""``train --logger tensorboard mlflow``: the runs hold the logged scalars, read back with TensorBoard's own
event reader and MLflow's client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atssdet.cli import main
from atssdet.data.synth import generate_synthetic_dataset

pytest.importorskip("tensorboard", reason="the 'loggers' extra (tensorboard) is not installed")
pytest.importorskip("mlflow", reason="the 'loggers' extra (mlflow-skinny) is not installed")

TINY_SET = [
    "--set", "backbone=resnet18", "--set", "train_image_short_size=[64]", "--set", "train_image_max_size=64",
    "--set", "test_image_short_size=64", "--set", "test_image_max_size=64", "--set", "fpn_out_channels=16",
    "--set", "fpn_top_in_channel=16", "--set", "head_num_convs=1", "--set", "head_norm_groups=4",
    "--set", "backbone_norm=GN", "--set", "backbone_freeze_at=0",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loggers")
    ds = generate_synthetic_dataset(root / "data", num_train=4, num_val=2, image_size=(64, 64), progress=False,
                                    log=lambda m: None)  # fmt: skip
    out = root / "run"
    code = main([
        "train", "--data", str(root / "data"), "--val-data", str(ds.val_ann), "--val-images", str(ds.val_images),
        "--out", str(out), "--max-iters", "2", "--eval-every", "1", "--log-every", "1", "--batch-size", "2",
        "--workers", "0", "--device", "cpu", "--no-progress", "--checkpoint-every", "100", "--data-check", "quick",
        "--logger", "tensorboard", "mlflow", "--log-val-images", "2", *TINY_SET,
    ])  # fmt: skip
    assert code == 0
    return out


def _jsonl(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = {r["iteration"]: r for r in records if "event" not in r}
    evals = {r["iteration"]: r for r in records if r.get("event") == "eval"}
    return steps, evals


def test_tensorboard_event_files_hold_the_scalars_and_images(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    steps, evals = _jsonl(run_dir)
    tags = acc.Tags()
    for tag in ("train/total_loss", "train/loss_cls", "train/lr", "train/images_per_s", "train/max_mem_mb"):
        assert tag in tags["scalars"], tag
    loss = {e.step: e.value for e in acc.Scalars("train/total_loss")}
    assert sorted(loss) == [1, 2]
    for i, v in loss.items():
        assert v == pytest.approx(steps[i]["total_loss"], rel=1e-6)
    lr = {e.step: e.value for e in acc.Scalars("train/lr")}
    assert lr[2] == pytest.approx(steps[2]["lr"], rel=1e-6) and lr[2] > lr[1]  # the warm-up
    ap = {e.step: e.value for e in acc.Scalars("val/AP")}
    assert sorted(ap) == [1, 2] and ap[2] == pytest.approx(evals[2]["bbox/AP"], abs=1e-6)
    assert {"val_images/0", "val_images/1"} <= set(tags["images"])
    assert [e.step for e in acc.Images("val_images/0")] == [1, 2]


def test_mlflow_run_holds_the_scalars_params_and_images(run_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("atssdet")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    steps, evals = _jsonl(run_dir)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/total_loss")}
    assert sorted(history) == [1, 2]
    for i, v in history.items():
        assert v == pytest.approx(steps[i]["total_loss"], rel=1e-6)
    ap50 = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/AP50")}
    assert ap50[2] == pytest.approx(evals[2]["bbox/AP50"], abs=1e-6)
    assert run.data.params["global_batch"] == "2" and run.data.params["config.backbone"] == "resnet18"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "val_images/0")]
    assert artifacts == ["val_images/0/step_00000001.png", "val_images/0/step_00000002.png"]


@pytest.mark.parametrize(
    ("raised", "status"), [(None, "FINISHED"), (RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_an_mlflow_run_ends_as_the_training_did(tmp_path, raised, status):
    """A run whose training raised is not left FINISHED (nor RUNNING) in MLflow."""
    import torch
    from mlflow.tracking import MlflowClient

    from atssdet.training.log import TrainLog
    from atssdet.training.loggers import LoggerOptions

    opts = LoggerOptions(names=("mlflow",))
    try:
        with TrainLog(tmp_path / "train_log.jsonl", start=0, end=1, log_every=1, progress=False,
                      device=torch.device("cpu"), loggers=opts):  # fmt: skip
            if raised is not None:
                raise raised("stop")
    except (RuntimeError, KeyboardInterrupt):
        pass
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("atssdet").experiment_id])
    assert run.info.status == status
