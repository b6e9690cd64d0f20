"""Tracking: ids stable through a crossing (hand-made boxes), track ids in predict_video's JSON lines,
the synthetic MOT video, and bad tracker names."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from atssdet.cli import main
from atssdet.detector import Detector
from atssdet.errors import OptionError
from atssdet.structures import Detections
from atssdet.tracking import TRACKERS, Tracker, check_tracker
from atssdet.video import predict_video
from tests.blob_runner import BlobRunner

pytest.importorskip(
    "trackers", reason="the 'trackers' package (pip install --no-deps trackers) is not installed"
)


def crossing(frames: int = 40, hide: range = range(0)) -> list[list[tuple[int, list[float]]]]:
    """Two 20 px boxes crossing: A left->right at y=40, B right->left at y=50 (IoU up to 0.43 as
    they pass); B is missing (occluded) in the frames of ``hide``. Per frame: (true id, box)."""
    out = []
    for f in range(frames):
        ax, bx = 10 + 4 * f, 170 - 4 * f
        frame = [(0, [ax, 40, ax + 20, 60])]
        if f not in hide:
            frame.append((1, [bx, 50, bx + 20, 70]))
        out.append(frame)
    return out


def run_tracker(name: str, sequence) -> dict[int, set[int]]:
    """True id -> the set of track ids it got (frames where it was tracked)."""
    tracker = Tracker(name)
    got: dict[int, set[int]] = {0: set(), 1: set()}
    frame = np.zeros((240, 320, 3), np.uint8)
    for items in sequence:
        boxes = torch.tensor([b for _, b in items], dtype=torch.float32)
        det = Detections(boxes, torch.full((len(items),), 0.9), torch.zeros(len(items), dtype=torch.long))
        ids = tracker.update(det, frame)
        assert ids.shape == (len(items),)
        for (true_id, _), tid in zip(items, ids.tolist(), strict=True):
            if tid >= 0:
                got[true_id].add(tid)
    return got


@pytest.mark.parametrize("name", TRACKERS)
@pytest.mark.parametrize("hide", [range(0), range(19, 23)], ids=["visible", "occluded"])
def test_ids_stay_stable_through_a_crossing(name: str, hide: range) -> None:
    got = run_tracker(name, crossing(hide=hide))
    assert len(got[0]) == 1 and len(got[1]) == 1, got  # one id each, kept through the crossing
    assert got[0] != got[1]


def test_bad_tracker_names_are_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(
        OptionError, match=r"tracker 'sort': unknown tracker; choose one of bytetrack, botsort"
    ):
        check_tracker("sort")
    with pytest.raises(OptionError, match="unknown tracker"):
        predict_video(tmp_path / "missing.mp4", detector=None, out_dir=tmp_path, track="deepsort")  # type: ignore[arg-type]
    assert main(["predict", "x.mp4", "--weights", "w.safetensors", "--track", "kcf"]) == 2
    assert "atssdet predict: error: tracker 'kcf': unknown tracker" in capsys.readouterr().err
    with pytest.raises(OptionError, match="bad option"):
        Tracker("bytetrack", options={"speed": 3})


def write_blob_video(path: Path, frames: int = 24) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10.0, (160, 96))
    for f in range(frames):
        image = np.zeros((96, 160, 3), np.uint8)
        ax, bx = 8 + 5 * f, 136 - 5 * f
        image[20:36, ax : ax + 16, 2] = 255  # A moves right, B left, a row lower: they pass each other
        image[50:66, bx : bx + 16, 2] = 255
        writer.write(image)
    writer.release()


def test_predict_video_writes_and_draws_track_ids(tmp_path: Path) -> None:
    video = tmp_path / "two.mp4"
    write_blob_video(video)
    det = Detector(BlobRunner(), short_size=96, max_size=160)
    report = predict_video(video, detector=det, out_dir=tmp_path / "out", track="bytetrack", progress=False)
    lines = [json.loads(line) for line in report.jsonl_path.read_text().splitlines()]
    assert len(lines) == 24 and report.video_path is not None and report.video_path.stat().st_size > 0
    ids_by_row: dict[str, set[int]] = {"top": set(), "bottom": set()}
    for line in lines:
        assert len(line["detections"]) == 2
        for d in line["detections"]:
            assert isinstance(d["track_id"], int)
            if d["track_id"] >= 0:
                ids_by_row["top" if d["box"][1] < 40 else "bottom"].add(d["track_id"])
    assert len(ids_by_row["top"]) == 1 and len(ids_by_row["bottom"]) == 1
    assert ids_by_row["top"] != ids_by_row["bottom"]
    tracked = sum(d["track_id"] >= 0 for line in lines for d in line["detections"])
    assert tracked >= 2 * 24 - 4  # all but the frames before a track is confirmed


def test_synthetic_video_has_mot_ground_truth_with_occlusions(tmp_path: Path) -> None:
    from atssdet.data.synth_video import generate_video

    out = generate_video(tmp_path / "v", num_frames=40, size=(120, 160), num_objects=6, seed=3)
    rows = np.loadtxt(out.gt_file, delimiter=",", ndmin=2)
    assert rows.shape[1] == 9 and set(rows[:, 0].astype(int)) <= set(range(1, 41))
    assert set(rows[:, 1].astype(int)) == set(range(1, 7))
    x, y, w, h, vis = rows[:, 2], rows[:, 3], rows[:, 4], rows[:, 5], rows[:, 8]
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 160).all() and (y + h <= 120).all()
    assert (vis >= 0.2).all() and (vis <= 1).all() and (vis < 1).any()  # some objects get occluded
    capture = cv2.VideoCapture(str(out.video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 40
    capture.release()
    assert json.loads(out.tracks_file.read_text()).keys() == {str(i) for i in range(1, 7)}
