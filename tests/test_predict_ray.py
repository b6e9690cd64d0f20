"""`predict --engine ray` on a local Ray (2 CPUs, one session for the module): the records equal
``Detector.predict`` image by image, also when a model actor is SIGKILLed mid-job (acceptance 1 Ray,
acceptance 5); the two stages on their own (bytes, URIs, bad files) without Ray."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from atssdet.cli import main
from tests.conftest import REPO_ROOT
from tests.predict_scale import (
    SHORT,
    SIZE_ARGS,
    assert_records_match,
    read_jsonl,
    reference,
    tiny_detector,
    write_images,
    write_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'atssdet[ray]'")
    pytest.importorskip("ray.data", reason="Ray Data is an optional extra: pip install 'atssdet[ray]'")
    env = {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}  # workers import this checkout
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": env},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _model_actor_pids() -> list[int]:
    """Processes of the model stage's actors (Ray names each ``ray::MapWorker(MapBatches(_ModelStage))``)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"_ModelStage" in cmdline and b"MapWorker" in cmdline:
                pids.append(int(entry))
    return pids


def test_ray_engine_with_a_killed_actor_has_every_image_once(ray_session, tmp_path: Path, capsys) -> None:
    """200 images + 2 bad files through 2 model actors; one actor is SIGKILLed once 30 records are in:
    Ray Data restarts it and retries its batch, and the stream holds every image once with the
    detections of ``Detector.predict`` alone."""
    images = write_images(tmp_path / "images")
    weights = write_weights(tmp_path)
    out = tmp_path / "out"
    stream = out / "predictions.jsonl"
    killed: list[int] = []

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if stream.exists() and stream.read_bytes().count(b"\n") >= 30 and (pids := _model_actor_pids()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    code = main(
        ["predict", str(images), "--weights", str(weights), "--out", str(out), "--engine", "ray",
         "--concurrency", "2", "--batch-size", "8", *SIZE_ARGS]
    )  # fmt: skip
    killer.join(timeout=5)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert killed, "no model actor was found to kill (or the job ended before 30 records)"
    records = read_jsonl(stream)
    assert_records_match(records, images)
    assert "200 image(s) done, 2 failed" in captured.out
    assert not any(p.suffix in (".png", ".jpg") for p in out.iterdir())  # no drawings with Ray


def test_stages_without_ray(tmp_path: Path) -> None:
    """The CPU stage decodes paths, ``file://`` URIs (pyarrow) and bytes, and turns bad inputs into
    error rows; the model stage gives the reference detections."""
    pytest.importorskip("pyarrow", reason="pyarrow comes with the ray extra")
    from atssdet.ray_predict import _decode_batch, _ModelStage, row_detections

    folder = write_images(tmp_path / "few", n=3)
    paths = [str(folder / "im0000.png"), f"file://{folder / 'im0001.png'}", str(folder / "broken.jpg")]
    batch = {"path": np.asarray(paths, dtype=object), "index": np.arange(3)}
    det = tiny_detector()
    decoded = _decode_batch(batch, (det.short_size, det.max_size))
    assert decoded["pixels"][0].shape[0] == SHORT and list(decoded["error"][:2]) == ["", ""]
    assert "broken.jpg" in decoded["error"][2]
    rows = _ModelStage(det, None)(decoded)
    ref = reference(folder)
    for i, name in enumerate(("im0000.png", "im0001.png")):
        row = {k: v[i] for k, v in rows.items()}
        result = row_detections(row, det.cfg.class_names)
        np.testing.assert_allclose(result.to_array().numpy(), ref[str(folder / name)], atol=1e-4)
    assert rows["error"][2] and rows["detections"][2] == "[]"
    as_bytes = {"bytes": np.asarray([(folder / "im0002.png").read_bytes()], dtype=object)}
    lazy = _decode_batch(as_bytes, None)  # sizes unknown here: the model stage resizes
    result = row_detections(
        {k: v[0] for k, v in _ModelStage(lambda: det, None)(lazy).items()}, det.cfg.class_names
    )
    np.testing.assert_allclose(result.to_array().numpy(), ref[str(folder / "im0002.png")], atol=1e-4)
