"""Multi-object tracking on per-frame detections: an adapter to Roboflow's ``trackers`` package.

``trackers`` (Apache-2.0) holds clean-room ByteTrack and BoT-SORT implementations on supervision's
``Detections`` (and TrackEval-parity MOTA / IDF1 / HOTA, used by ``benchmarks/bench_tracking.py``);
atssdet does not write a tracker of its own. :class:`Tracker` feeds it one frame's
:class:`~atssdet.structures.Detections` and returns a track id per detection (-1: not in a
confirmed track). ``trackers`` declares ``opencv-python`` (the non-headless wheel, which would
replace ``cv2``), so it is installed with ``--no-deps`` (Makefile; its real dependencies are the
``tracking`` extra of pyproject.toml). No torch import here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from atssdet.errors import OptionError

if TYPE_CHECKING:
    from atssdet.structures import Detections

TRACKERS = ("bytetrack", "botsort")
_CLASSES = {"bytetrack": "ByteTrackTracker", "botsort": "BoTSORTTracker"}
# The detector's scores are not YOLO's: ByteTrack's split into high/low detections and the score
# that starts a track are lowered from trackers' 0.6 / 0.7 to values the demo model reaches.
DEFAULTS: dict[str, Any] = {"high_conf_det_threshold": 0.5, "track_activation_threshold": 0.5}


def check_tracker(name: str) -> str:
    """``name`` if it is a known tracker, else :class:`~atssdet.errors.OptionError` naming the choices."""
    if name not in TRACKERS:
        raise OptionError(f"tracker {name!r}: unknown tracker; choose one of {', '.join(TRACKERS)}")
    return name


class Tracker:
    """One video's tracker: :meth:`update` once per frame, in order.

    ``name``: ``"bytetrack"`` or ``"botsort"`` (BoT-SORT also estimates camera motion from the frame);
    ``fps`` sets how long a lost track is kept (``lost_track_buffer`` frames at 30 fps); ``options``
    are keyword arguments of the trackers class (e.g. ``minimum_consecutive_frames``), over
    :data:`DEFAULTS`.
    """

    def __init__(self, name: str, *, fps: float = 30.0, options: dict[str, Any] | None = None) -> None:
        check_tracker(name)
        try:
            import supervision
            import trackers
        except ImportError as exc:
            raise OptionError(
                f"tracker {name!r} needs the 'trackers' package: pip install supervision && "
                f"pip install --no-deps trackers (see the 'tracking' extra); {exc}"
            ) from None
        self.name = name
        self._sv = supervision
        cls = getattr(trackers, _CLASSES[name])
        try:
            self._tracker = cls(frame_rate=fps, **{**DEFAULTS, **(options or {})})
        except TypeError as exc:
            raise OptionError(f"tracker {name!r}: bad option: {exc}") from None

    def update(self, det: Detections, frame: np.ndarray | None = None) -> np.ndarray:
        """Track ids ``[K]`` int64 for ``det``'s K detections, in ``det``'s order (-1: not tracked)."""
        k = len(det)
        sv_det = self._sv.Detections(
            xyxy=det.boxes.numpy().astype(np.float32).reshape(-1, 4),
            confidence=det.scores.numpy().astype(np.float32),
            class_id=det.labels.numpy().astype(np.int64),
            data={"index": np.arange(k)},
        )
        out = self._tracker.update(sv_det, frame) if self.name == "botsort" else self._tracker.update(sv_det)
        ids = np.full(k, -1, dtype=np.int64)
        if len(out) and out.tracker_id is not None:
            ids[np.asarray(out.data["index"], dtype=np.int64)] = np.asarray(out.tracker_id, dtype=np.int64)
        return ids


def track_color(track_id: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per track id."""
    hsv = np.array([[[(track_id * 47) % 180, 220, 255]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].tolist()
    return int(b), int(g), int(r)


def draw_track_ids(canvas: np.ndarray, boxes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Write ``#id`` inside the bottom-left corner of each tracked box (id >= 0), in place; returns it."""
    h, w = canvas.shape[:2]
    scale = max(0.35, (h * h + w * w) ** 0.5 / 1500)
    for (x1, _y1, x2, y2), tid in zip(boxes.tolist(), ids.tolist(), strict=True):  # drawing, per shown box
        if tid < 0:
            continue
        color = track_color(tid)
        org = (int(max(x1, 0)) + 2, int(min(y2, h)) - 3)
        cv2.rectangle(canvas, (int(x1), int(_y1)), (int(x2), int(y2)), color, 1, lineType=cv2.LINE_8)
        cv2.putText(canvas, f"#{tid}", org, cv2.FONT_HERSHEY_SIMPLEX, scale, color, 1, lineType=cv2.LINE_AA)
    return canvas
