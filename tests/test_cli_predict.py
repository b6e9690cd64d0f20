from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from atssdet.cli import main
from atssdet.convert import save_safetensors
from tests.conftest import R18, run_cli

SIZE_ARGS = ["--short-size", "160", "--max-size", "256", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def r18_safetensors(r18_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "r18.safetensors"
    return save_safetensors(r18_model.state_dict(), path, cfg=r18_model.cfg)


@pytest.fixture
def mixed_folder(tmp_path: Path, reference_dir: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(reference_dir / "cat.jpg", folder / "cat.jpg")
    cv2.imwrite(
        str(folder / "small.png"), np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    )
    (folder / "corrupt.jpg").write_bytes((reference_dir / "cat.jpg").read_bytes()[:2000][::-1])
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_cli_folder_with_bad_files_coco(mixed_folder: Path, tmp_path: Path, r18_safetensors: Path) -> None:
    out = tmp_path / "out"
    # --weights alone: the safetensors file carries the model config.
    proc = run_cli(
        "predict",
        str(mixed_folder),
        "--weights",
        str(r18_safetensors),
        "--out",
        str(out),
        "--coco",
        *SIZE_ARGS,
    )
    assert proc.returncode == 0, proc.stderr
    assert "corrupt.jpg" in proc.stderr and "notes.txt" in proc.stderr  # both bad files named
    assert "2 image(s) done, 2 failed" in proc.stdout and "cat.jpg" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "cat.jpg",
        "images_coco.json",
        "predictions.jsonl",  # the stream the COCO files were made from (docs/scale.md)
        "predictions.parts.json",
        "predictions_coco.json",
        "small.png",
    ]
    assert cv2.imread(str(out / "cat.jpg")).shape == (612, 459, 3)
    from pycocotools.coco import COCO

    gt = COCO(str(out / "images_coco.json"))
    dt = gt.loadRes(str(out / "predictions_coco.json"))
    # Image ids are 1-based positions in the sorted folder listing, so failures do not shift them.
    assert sorted(dt.getImgIds()) == [1, 4] and len(dt.getAnnIds()) == 200
    assert {im["file_name"] for im in gt.dataset["images"]} == {"cat.jpg", "small.png"}
    assert min(a["category_id"] for a in dt.dataset["annotations"]) >= 1


def test_cli_json_output_and_options(
    mixed_folder: Path, tmp_path: Path, r18_safetensors: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = [str(mixed_folder / "cat.jpg"), str(mixed_folder / "*.txt"), "--weights", str(r18_safetensors)]
    code = main(
        ["predict", *args, "--out", str(out), "--classes", "spoon", "chair", "--batch-size", "2", *SIZE_ARGS]
    )
    captured = capsys.readouterr()
    assert code == 0 and "notes.txt" in captured.err
    doc = json.loads((out / "predictions.json").read_text())
    (image,) = doc["images"]
    assert image["file"].endswith("cat.jpg") and image["height"] == 612 and image["width"] == 459
    assert {d["name"] for d in image["detections"]} == {"spoon", "chair"}
    assert [f["file"] for f in doc["failed"]] == [str(mixed_folder / "notes.txt")]


def test_cli_nothing_readable_fails(tmp_path: Path, r18_safetensors: Path, capsys) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    (folder / "b.txt").write_text("text")
    code = main(
        ["predict", str(folder), "--weights", str(r18_safetensors), "--out", str(tmp_path / "o"), *SIZE_ARGS]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "a.jpg" in captured.err and "b.txt" in captured.err and "0 image(s) done" in captured.out


def test_cli_pkl_weights_need_model(r18_checkpoint: Path, tmp_path: Path, capsys) -> None:
    code = main(["predict", str(tmp_path), "--weights", str(r18_checkpoint), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--model NAME" in err and str(r18_checkpoint) in err


def test_cli_models_lists_zoo_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("ATSSDET_HOME", str(tmp_path))
    (tmp_path / "atss_res50_coco_3x_800size.safetensors").write_bytes(b"x")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[2:7]}
    assert len(rows) == 5 and "42.6" in rows["atss_res50_coco_3x_800size"]
    assert "yes" in rows["atss_res50_coco_3x_800size"] and " no " in rows["atss_res18_coco_3x_800size"] + " "
    assert "45.6" in rows["atss_resx101_coco_2x_800size"]


def test_cli_numerics_megengine(reference_dir: Path, r18_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """--numerics megengine reaches the model (recorded in the JSON) and moves scores by ~1e-6 only."""
    scores = {}
    for numerics in ("torch", "megengine"):
        out = tmp_path / numerics
        args = [str(reference_dir / "cat.jpg"), "--weights", str(r18_checkpoint), "--model", R18]
        code = main(["predict", *args, "--out", str(out), "--numerics", numerics, "--no-draw", *SIZE_ARGS])
        assert code == 0, capsys.readouterr().err
        doc = json.loads((out / "predictions.json").read_text())
        assert doc["model"]["numerics"] == numerics
        scores[numerics] = np.array([d["score"] for d in doc["images"][0]["detections"]])
    assert scores["torch"].shape == scores["megengine"].shape
    assert np.abs(scores["torch"] - scores["megengine"]).max() < 1e-4


def test_numerics_megengine_is_refused_where_it_cannot_run(r18_model_mge, tmp_path: Path) -> None:
    from atssdet.detector import Detector
    from atssdet.export import export_onnx

    with pytest.raises(ValueError, match="cannot be traced to ONNX"):
        export_onnx(r18_model_mge, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.onnx: numerics='megengine' needs the PyTorch model"):
        Detector.from_checkpoint(tmp_path / "x.onnx", numerics="megengine")


def _write_video(path: Path, frames: list[np.ndarray], fps: float = 5.0) -> None:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def _read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def test_cli_video_frames_json_and_drawn_mp4(
    reference_dir: Path, r18_safetensors: Path, tmp_path: Path, capsys
):
    """A video among the inputs: every frame detected like an image; a drawn .mp4 (same size, frame
    count and rate) and one JSON line per frame; a corrupt video is reported and skipped."""
    from atssdet.detector import Detector

    cat = cv2.imread(str(reference_dir / "cat.jpg"))
    frames = [np.ascontiguousarray(np.roll(cat, 12 * i, axis=1)[:240, :320]) for i in range(4)]
    video = tmp_path / "clip.avi"
    _write_video(video, frames)
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    out = tmp_path / "out"
    (out / "broken.detections.jsonl").parent.mkdir(parents=True)
    (out / "broken.detections.jsonl").write_text("kept\n")  # an earlier result of that name stays
    code = main(["predict", str(video), str(tmp_path / "broken.mp4"), "--weights", str(r18_safetensors),
                 "--out", str(out), *SIZE_ARGS])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "clip.avi: 4 frames at 5 fps" in captured.out
    assert "skipped" in captured.err and "broken.mp4" in captured.err
    assert (out / "broken.detections.jsonl").read_text() == "kept\n"

    lines = [json.loads(line) for line in (out / "clip.detections.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in lines] == [0, 1, 2, 3]
    assert [r["time_s"] for r in lines] == [0.0, 0.2, 0.4, 0.6]
    decoded = _read_video(video)  # what the CLI saw (MJPG is lossy)
    detector = Detector.from_checkpoint(r18_safetensors, device="cpu", short_size=160, max_size=256)
    for record, frame in zip(lines, decoded, strict=True):
        (want,) = detector.predict([frame])
        assert (record["height"], record["width"]) == (240, 320)
        assert [d["label"] for d in record["detections"]] == want.labels.tolist()
        np.testing.assert_allclose([d["score"] for d in record["detections"]], want.scores.numpy(), rtol=1e-6)
    drawn = _read_video(out / "clip.mp4")
    assert len(drawn) == 4 and drawn[0].shape == (240, 320, 3)
    assert cv2.VideoCapture(str(out / "clip.mp4")).get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_predict_video_api_without_drawing_and_bad_video(r18_safetensors: Path, tmp_path: Path) -> None:
    from atssdet.detector import Detector
    from atssdet.video import predict_video

    frames = [np.full((64, 96, 3), 40 * i, np.uint8) for i in range(3)]
    video = tmp_path / "flat.avi"
    _write_video(video, frames, fps=10.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "flat.mp4").write_bytes(b"an earlier drawn video")
    detector = Detector.from_checkpoint(r18_safetensors, device="cpu", short_size=160, max_size=256)
    report = predict_video(video, detector=detector, out_dir=out, draw=False, progress=False)
    assert report.frames == 3 and report.fps == pytest.approx(10.0) and report.video_path is None
    assert len((out / "flat.detections.jsonl").read_text().splitlines()) == 3
    assert (out / "flat.mp4").read_bytes() == b"an earlier drawn video"  # draw=False writes no video
    with pytest.raises(ValueError, match=r"missing\.mkv: cannot open as a video"):
        predict_video(tmp_path / "missing.mkv", detector=detector, out_dir=out, progress=False)
    with pytest.raises(ValueError, match=r"name '\.\./up': a file name without folders"):
        predict_video(video, detector=detector, out_dir=out, progress=False, name="../up")
    assert not (tmp_path / "up.detections.jsonl").exists()


def test_cli_videos_sharing_a_name_keep_both_results(r18_safetensors: Path, tmp_path: Path, capsys) -> None:
    """Two videos called clip.avi from different folders: each gets its own outputs (clip, clip_2),
    neither replaces the other's."""
    for folder, frames in (("a", 2), ("b", 3)):
        (tmp_path / folder).mkdir()
        _write_video(
            tmp_path / folder / "clip.avi", [np.full((64, 96, 3), 60 * i, np.uint8) for i in range(frames)]
        )
    out = tmp_path / "out"
    code = main(["predict", str(tmp_path / "a" / "clip.avi"), str(tmp_path / "b" / "clip.avi"),
                 "--weights", str(r18_safetensors), "--out", str(out), "--no-draw", *SIZE_ARGS])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["clip.detections.jsonl", "clip_2.detections.jsonl"]
    assert len((out / "clip.detections.jsonl").read_text().splitlines()) == 2
    assert len((out / "clip_2.detections.jsonl").read_text().splitlines()) == 3
