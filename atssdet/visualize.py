"""Drawing detections on BGR images with OpenCV, and saving them (drawn image or JSON).

Every class is drawn, class 0 included (the seed's ``vis_det`` skipped label 0, "person"). Each
class has its own colour, chosen by stepping the hue by the golden ratio so that neighbouring class
ids get clearly different colours. :func:`draw` and :func:`save_detections` (the API) and
``atssdet predict`` (the CLI) draw the boxes scoring ``>= DRAW_SCORE_THRESHOLD`` by default.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from torch import Tensor

from atssdet.config import ATSSConfig
from atssdet.structures import Detections

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895

# MegEngine's ``test_vis_threshold`` default (0.3): the API draws what the CLI draws.
DRAW_SCORE_THRESHOLD: float = ATSSConfig.test_vis_threshold

# Suffixes :func:`save_detections` writes as drawn images (anything else but .json is refused).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed, bright BGR colour for class ``label`` (0..C-1)."""
    hue = (0.05 + label * _GOLDEN_RATIO_CONJUGATE) % 1.0
    saturation = 0.85 if label % 2 == 0 else 0.65
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, 0.95)
    return int(round(b * 255)), int(round(g * 255)), int(round(r * 255))


def _as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def draw_detections(
    image: np.ndarray,
    boxes: Tensor | np.ndarray,
    scores: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    class_names: Sequence[str] = (),
    *,
    score_threshold: float = 0.0,
    thickness: int | None = None,
) -> np.ndarray:
    """Draw boxes and ``"name score"`` captions on a copy of ``image`` and return it.

    ``image`` is BGR uint8 ``[H, W, 3]`` (grey ``[H, W]`` is converted); ``boxes`` ``[K, 4]`` xyxy in
    that image's pixels, ``scores`` ``[K]``, ``labels`` ``[K]`` (0..C-1, all drawn). Only boxes with
    ``score >= score_threshold`` are drawn; higher scores are drawn last so they stay on top.
    ``thickness`` defaults to about 1/400 of the image diagonal (at least 1 px).
    """
    canvas = np.ascontiguousarray(image if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR))
    canvas = canvas.copy()
    boxes_np = _as_numpy(boxes).reshape(-1, 4).astype(np.float64)
    scores_np = _as_numpy(scores).reshape(-1).astype(np.float64)
    labels_np = _as_numpy(labels).reshape(-1).astype(np.int64)
    h, w = canvas.shape[:2]
    if thickness is None:
        thickness = max(1, int(round((h * h + w * w) ** 0.5 / 400)))
    font_scale = max(0.35, thickness / 3)
    font = cv2.FONT_HERSHEY_SIMPLEX
    order = np.argsort(scores_np, kind="stable")  # low scores first, best boxes end up on top
    for i in order:
        if scores_np[i] < score_threshold:
            continue
        label = int(labels_np[i])
        color = class_color(label)
        x1, y1, x2, y2 = (int(round(v)) for v in boxes_np[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_8)
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        caption = f"{name} {scores_np[i]:.2f}"
        (tw, th), baseline = cv2.getTextSize(caption, font, font_scale, 1)
        # Caption above the box when there is room, else inside its top edge.
        top = y1 - th - baseline - 2 if y1 - th - baseline - 2 >= 0 else y1 + thickness
        top = min(max(top, 0), max(h - th - baseline - 2, 0))
        left = min(max(x1, 0), max(w - tw - 2, 0))
        cv2.rectangle(canvas, (left, top), (left + tw + 2, top + th + baseline + 2), color, cv2.FILLED)
        luminance = 0.114 * color[0] + 0.587 * color[1] + 0.299 * color[2]
        text_color = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        cv2.putText(
            canvas, caption, (left + 1, top + th + 1), font, font_scale, text_color, 1, lineType=cv2.LINE_AA
        )
    return canvas


def draw(
    det: Detections,
    image: np.ndarray | None = None,
    *,
    score_threshold: float = DRAW_SCORE_THRESHOLD,
    thickness: int | None = None,
) -> np.ndarray:
    """``det`` drawn on ``image`` (else the kept ``det.image``, else ``det.source`` read again).

    Draws every detection scoring ``>= score_threshold``; returns a BGR uint8 ``[H, W, 3]`` copy
    (the input is untouched). Raises ValueError when there is no image to draw on.
    """
    if image is None:
        image = det.image
    if image is None:
        if det.source is None or not Path(det.source).is_file():
            raise ValueError(
                f"{det.source or 'detections'}: no image to draw on; pass draw(det, image=BGR array)"
            )
        from atssdet.data.image_io import read_image

        image = read_image(det.source)
    return draw_detections(
        image,
        det.boxes,
        det.scores,
        det.labels,
        det.class_names,
        score_threshold=score_threshold,
        thickness=thickness,
    )


def save_detections(
    det: Detections,
    path: str | os.PathLike[str],
    *,
    image: np.ndarray | None = None,
    score_threshold: float = DRAW_SCORE_THRESHOLD,
) -> Path:
    """Write ``path`` atomically: ``.json`` -> ``det.to_dict()``; an image suffix -> :func:`draw`."""
    from atssdet.fileio import atomic_write_bytes, atomic_write_text

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        return atomic_write_text(path, json.dumps(det.to_dict(), indent=1) + "\n")
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(f"{path}: unsupported output type; use .json or one of {', '.join(IMAGE_SUFFIXES)}")
    drawn = draw(det, image, score_threshold=score_threshold)
    ok, encoded = cv2.imencode(suffix, drawn)
    if not ok:
        raise ValueError(f"{path}: OpenCV cannot encode {suffix} images")
    return atomic_write_bytes(path, encoded.tobytes())
