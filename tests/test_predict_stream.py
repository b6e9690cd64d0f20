"""Streaming predict: one record per image (JSONL/Parquet) equal to Detector.predict image by image,
error records for bad files, resume after SIGKILL without redoing finished images, the final files
from the stream, the guard on streams, and the scale flags' messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from atssdet.cli import main
from atssdet.fileio import close_stream, open_stream, written_by
from atssdet.predict import predict_files
from atssdet.predict_stream import MANIFEST, read_part, stream_files
from tests.conftest import REPO_ROOT
from tests.helpers import sigkill_when
from tests.predict_scale import (
    BAD_FILES,
    NUM_IMAGES,
    SIZE_ARGS,
    assert_records_match,
    read_jsonl,
    reference,
    tiny_detector,
    write_images,
    write_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_RESUME = 60  # images of the kill-and-resume run


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_images(tmp_path_factory.mktemp("scale") / "images")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_weights(tmp_path_factory.mktemp("weights"))


def test_jsonl_stream_matches_single_image_predict(images: Path, tmp_path: Path) -> None:
    """Acceptance 1 (predict): batch 4, 200 images + 2 bad files: every image once, same detections as
    ``Detector.predict`` alone; the bad files are error records; predictions.json comes from the stream."""
    out = tmp_path / "out"
    report = predict_files(
        [str(images)], detector=tiny_detector(), out_dir=out, batch_size=4, draw=False, progress=False
    )
    assert report.num_ok == NUM_IMAGES and len(report.failed) == len(BAD_FILES)
    records = read_jsonl(out / "predictions.jsonl")
    assert_records_match(records, images)
    assert [r["file"] for r in records] == sorted(r["file"] for r in records)  # input order
    doc = json.loads((out / "predictions.json").read_text())
    assert [im["file"] for im in doc["images"]] == [r["file"] for r in records if r["error"] is None]
    assert [im["image_id"] for im in doc["images"][:2]] == [2, 3]  # 1 is broken.jpg (failed)
    assert len(doc["failed"]) == 2
    assert doc["images"][5]["detections"] == [r for r in records if r["error"] is None][5]["detections"]
    listing = json.loads((out / MANIFEST).read_text())
    assert listing == {"format": "jsonl", "parts": ["predictions.jsonl"], "images": NUM_IMAGES, "failed": 2}
    assert written_by(out / "predictions.jsonl") == "predict"


def test_workers_and_parquet_and_coco(tmp_path: Path) -> None:
    """``workers=1`` (decoding in a DataLoader process) into Parquet gives the same records; --coco
    results come from the stream."""
    folder = write_images(tmp_path / "few", n=12)
    out = tmp_path / "out"
    report = predict_files(
        [str(folder)], detector=tiny_detector(), out_dir=out, workers=1, format="parquet",
        coco=True, draw=False, progress=False,
    )  # fmt: skip
    assert report.num_ok == 12
    parts = stream_files(out)
    assert parts and all(p.suffix == ".parquet" for p in parts)
    assert_records_match([r for p in parts for r in read_part(p)], folder)
    results = json.loads((out / "predictions_coco.json").read_text())
    expected = sum(len(v) for v in reference(folder).values())
    assert len(results) == expected and {r["image_id"] for r in results} <= set(range(1, 15))
    again = predict_files(
        [str(folder)], detector=tiny_detector(), out_dir=out, format="parquet", draw=False, progress=False
    )  # resumes: the Parquet parts are read back
    assert again.skipped == 14 and again.num_ok == 0 and stream_files(out) == parts
    skeleton = json.loads((out / "images_coco.json").read_text())
    assert len(skeleton["images"]) == 12 and skeleton["images"][0]["file_name"] == "im0000.png"


def test_sigkill_then_resume_does_each_image_once(weights: Path, tmp_path: Path) -> None:
    """Acceptance 2: `predict` SIGKILLed part-way, re-run into the same folder: every image exactly
    once, the recorded ones not run again (forward passes counted) and their lines left as they were."""
    images = write_images(tmp_path / "images", n=NUM_RESUME)
    out = tmp_path / "out"
    stream = out / "predictions.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "atssdet", "predict", str(images), "--weights", str(weights),
         "--out", str(out), "--no-draw", *SIZE_ARGS],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip

    def some_done() -> bool:
        return stream.exists() and stream.read_bytes().count(b"\n") >= 15

    sigkill_when(proc, some_done, "15 records in the stream")
    before = stream.read_bytes()
    complete = before[: before.rfind(b"\n") + 1]
    recorded = {json.loads(line)["file"] for line in complete.splitlines()}
    assert 15 <= len(recorded) < NUM_RESUME + len(BAD_FILES), len(recorded)

    det = tiny_detector()
    seen: list[int] = []
    detect = det.runner.detect

    def counting_detect(batch, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(batch.shape[0])
        return detect(batch, *args, **kwargs)

    det.runner.detect = counting_detect  # type: ignore[method-assign]
    report = predict_files([str(images)], detector=det, out_dir=out, draw=False, progress=False)
    todo = NUM_RESUME + len(BAD_FILES) - len(recorded)
    bad_left = len([b for b in BAD_FILES if str(images / b) not in recorded])
    assert sum(seen) == todo - bad_left  # the forward passes: only images not recorded before
    assert report.skipped == len(recorded) and report.num_ok + len(report.failed) == todo
    after = stream.read_bytes()
    assert after.startswith(complete)  # the finished records were not redone or rewritten
    assert_records_match(read_jsonl(stream), images)
    assert len(json.loads((out / "predictions.json").read_text())["images"]) == NUM_RESUME


def test_changed_file_is_done_again_and_stream_guard(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "few", n=4)
    out = tmp_path / "out"
    det = tiny_detector()
    predict_files([str(folder)], detector=det, out_dir=out, draw=False, progress=False)
    shutil.copy(folder / "im0001.png", folder / "im0000.png")  # new content: size/mtime change
    report = predict_files([str(folder)], detector=det, out_dir=out, draw=False, progress=False)
    assert report.num_ok == 1 and report.skipped == 5
    doc = json.loads((out / "predictions.json").read_text())
    assert [im["file"].rsplit("/", 1)[1] for im in doc["images"]] == [f"im000{i}.png" for i in range(4)]
    assert doc["images"][0]["detections"] == doc["images"][1]["detections"]  # im0000 is im0001 now
    # A stream the user put there (not written by predict) is refused before any image is read.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "predictions.jsonl").write_text('{"my": "notes"}\n')
    code = main(
        ["predict", str(folder), "--weights", str(write_weights(tmp_path)), "--out", str(foreign), *SIZE_ARGS]
    )
    assert code == 2 and (foreign / "predictions.jsonl").read_text() == '{"my": "notes"}\n'


def test_open_stream_cuts_a_partial_line_and_keeps_its_mark(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    stream = open_stream(path, mark="predict")
    stream.write(b'{"a": 1}\n{"b": 2')  # a killed writer's partial last line
    stream.flush()
    assert written_by(path) == "predict"  # grown since it was marked: still predict's stream
    stream.close()
    stream = open_stream(path, mark="predict")
    assert path.read_bytes() == b'{"a": 1}\n'
    close_stream(stream, path, mark="predict")
    path.write_bytes(b"")  # shrunk: someone else's now
    assert written_by(path) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--half"], "--half: half precision runs only on a CUDA device"),
        (["--ray-address", "auto"], "--ray-address only makes sense with --engine ray"),
        (["--workers", "-1"], "workers must be >= 0"),
    ],
)
def test_scale_flag_errors(flags: list[str], message: str, tmp_path: Path, capsys) -> None:
    folder = write_images(tmp_path / "few", n=1)
    code = main(["predict", str(folder), "--weights", "w.safetensors", "--out", "o", *flags, *SIZE_ARGS])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_engine_ray_without_ray_says_how_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    code = main(["predict", "x.png", "--weights", "w.safetensors", "--engine", "ray", "--out", "o"])
    assert code == 2 and "pip install 'atssdet[ray]'" in capsys.readouterr().err
