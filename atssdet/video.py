"""``atssdet predict`` on videos: :func:`predict_video` detects every frame, writes JSON lines and a drawn MP4."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from atssdet import visualize
from atssdet.detector import Detector
from atssdet.fileio import atomic_path
from atssdet.guard import OutputGuard
from atssdet.options import InferenceOptions
from atssdet.predict import COMMAND, unique_stem
from atssdet.structures import Detections
from atssdet.tracking import Tracker, check_tracker, draw_track_ids

# Inputs routed to :func:`predict_video` by ``atssdet predict`` (any container OpenCV's FFmpeg reads).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass
class VideoReport:
    """What :func:`predict_video` wrote: the drawn video, the per-frame JSON lines, frame count, time."""

    source: str
    video_path: Path | None
    jsonl_path: Path
    frames: int
    fps: float
    seconds: float


def predict_video(
    path: str | os.PathLike[str],
    *,
    detector: Detector,
    out_dir: str | os.PathLike[str],
    batch_size: int | None = None,
    options: InferenceOptions | None = None,
    draw: bool = True,
    draw_threshold: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
    track: str | None = None,
    tracker_options: dict[str, Any] | None = None,
    name: str | None = None,
) -> VideoReport:
    """Detect objects in every frame of a video and write the results into ``out_dir``, atomically.

    Frames are decoded one by one with OpenCV (any format its FFmpeg build reads) and go through
    :meth:`Detector.iter_predict` like any BGR array (``options`` default to ``detector.options``).
    Writes ``<stem>.detections.jsonl``, one line per frame ``{"frame", "time_s", "height", "width",
    "detections": [...]}``, and, with ``draw``, ``<stem>.mp4`` (MPEG-4 Part 2, the source's frame
    rate and size) with every detection scoring ``>= draw_threshold`` (default
    :data:`atssdet.visualize.DRAW_SCORE_THRESHOLD`) drawn. Both files appear only when the whole
    video is done; a video that cannot be opened or has no decodable frame raises ValueError naming it.
    Existing files of those names that ``predict`` did not write are refused (:class:`~atssdet.guard.
    OutputError`) before the first frame, unless ``overwrite``.

    ``track`` (``"bytetrack"`` or ``"botsort"``, :mod:`atssdet.tracking`) follows objects across
    frames: each detection of the JSON lines gets a ``track_id`` (-1: not in a confirmed track) and
    the video shows ``#id`` in each tracked box; ``tracker_options`` go to the tracker.

    ``name`` replaces ``<stem>`` in the output names (``predict`` gives ``clip_2`` to a second video
    called ``clip``, so one video's results never replace another's).
    """
    from tqdm import tqdm

    source = Path(path)
    if track is not None:
        check_tracker(track)  # a bad name fails before the video is opened
    capture, fps, total = _open(source)
    threshold = visualize.DRAW_SCORE_THRESHOLD if draw_threshold is None else draw_threshold
    video_out, jsonl_out = _output_paths(source, Path(out_dir), name)
    try:
        OutputGuard(COMMAND, inputs=[source], overwrite=overwrite).check(
            [jsonl_out, video_out] if draw else [jsonl_out]
        )
        tracker = None if track is None else Tracker(track, fps=fps, options=tracker_options)
    except BaseException:
        capture.release()
        raise
    start = time.perf_counter()
    count = 0
    results = detector.iter_predict(_frames(capture), batch_size=batch_size, options=options)
    writer = _LazyVideoWriter(video_out, fps)
    try:
        with contextlib.ExitStack() as stack:
            tmp_jsonl = stack.enter_context(atomic_path(jsonl_out, suffix=".jsonl", mark=COMMAND))
            tmp_video = (
                stack.enter_context(atomic_path(video_out, suffix=".mp4", mark=COMMAND)) if draw else None
            )
            lines = stack.enter_context(open(tmp_jsonl, "w", encoding="utf-8"))
            bar = stack.enter_context(tqdm(total=total, unit="frame", desc=source.name, disable=not progress))
            for result in results:
                ids = None if tracker is None else tracker.update(result, result.image)
                if tmp_video is not None:
                    writer.write(tmp_video, _drawn(result, threshold, ids))
                record = result.to_dict()
                del record["source"], record["error"]
                for item, tid in zip(record["detections"], [] if ids is None else ids.tolist(), strict=False):
                    item["track_id"] = tid
                lines.write(json.dumps({"frame": count, "time_s": round(count / fps, 6), **record}) + "\n")
                result.image = None
                count += 1
                bar.update(1)
            writer.release()  # before the temp file is renamed
            if count == 0:
                raise ValueError(f"{source}: no decodable frame")
    finally:
        writer.release()
        capture.release()
    return VideoReport(
        source=str(source),
        video_path=video_out if draw else None,
        jsonl_path=jsonl_out,
        frames=count,
        fps=fps,
        seconds=time.perf_counter() - start,
    )


def _drawn(result: Detections, threshold: float, ids: np.ndarray | None) -> np.ndarray:
    """The frame with its detections drawn (and ``#id`` in the tracked ones)."""
    canvas = visualize.draw(result, score_threshold=threshold)
    if ids is not None:
        shown = (result.scores >= threshold).numpy()
        draw_track_ids(canvas, result.boxes.numpy()[shown], ids[shown])
    return canvas


def plan_video(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    draw: bool = True,
    name: str | None = None,
) -> list[Path]:
    """The files :func:`predict_video` would write for ``path`` (and ``name``); ValueError naming it
    if it cannot be opened."""
    source = Path(path)
    capture, _, _ = _open(source)
    capture.release()
    video_out, jsonl_out = _output_paths(source, Path(out_dir), name)
    return [jsonl_out, video_out] if draw else [jsonl_out]


def output_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """The ``name`` of each video's outputs in one ``predict`` run: its stem, made unique
    (``a/clip.mp4``, ``b/clip.mp4`` -> ``clip``, ``clip_2``)."""
    used: set[str] = set()
    return [unique_stem(Path(p).stem, used) for p in paths]


def _open(source: Path) -> tuple[cv2.VideoCapture, float, int | None]:
    """``(capture, frames per second (25 when unknown), frame count or None)``; ValueError if unreadable."""
    capture = cv2.VideoCapture(str(source))
    if not source.is_file() or not capture.isOpened():
        capture.release()
        raise ValueError(f"{source}: cannot open as a video (missing, unsupported format or corrupt)")
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    fps = fps if math.isfinite(fps) and fps > 0 else 25.0
    return capture, fps, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None


def _frames(capture: cv2.VideoCapture) -> Iterator[np.ndarray]:
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield frame


def _output_paths(source: Path, out: Path, name: str | None = None) -> tuple[Path, Path]:
    """``(<name>.mp4, <name>.detections.jsonl)`` in ``out`` (``name``: the source's stem unless
    given); never the source video itself."""
    if name is not None and (not name or name in (".", "..") or Path(name).name != name or "\\" in name):
        raise ValueError(f"name {name!r}: a file name without folders is needed (the outputs go into {out})")
    stem = source.stem if name is None else name
    video_out = out / f"{stem}.mp4"
    if video_out.resolve() == source.resolve():
        video_out = out / f"{stem}.detections.mp4"
    return video_out, out / f"{stem}.detections.jsonl"


class _LazyVideoWriter:
    """An MPEG-4 writer opened at the first frame (its size is the drawn frame's)."""

    def __init__(self, target: Path, fps: float) -> None:
        self.target = target  # the final name, for errors
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None

    def write(self, tmp_path: Path, frame: np.ndarray) -> None:
        if self.writer is None:
            h, w = frame.shape[:2]
            self.writer = cv2.VideoWriter(str(tmp_path), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, (w, h))
            if not self.writer.isOpened():
                raise ValueError(f"{self.target}: OpenCV cannot write MPEG-4 video here")
        self.writer.write(frame)

    def release(self) -> None:
        if self.writer is not None:
            self.writer.release()
