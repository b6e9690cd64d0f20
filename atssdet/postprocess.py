"""From raw dense predictions to detections, reproducing MegEngine's ``DetEvaluator.predict``.

Each image is one vectorised pass (torchvision ``batched_nms`` keyed by class); no Python loop over
classes or boxes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from atssdet.config import COCO_CLASSES
from atssdet.modeling.atss import ATSSOutput
from atssdet.ops.boxes import ltrb_to_xyxy

# COCO category id of each of the 80 contiguous labels (the official ids run 1..90 with gaps).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)  # fmt: skip

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(eq=False)
class Detections:
    """Detections of one image: ``boxes`` ``[K, 4]`` xyxy in original pixels, ``scores`` ``[K]``, ``labels`` ``[K]`` (0..C-1).

    :func:`select_detections` fills only the three tensors. :class:`atssdet.predict.Detector` also
    sets ``class_names`` (all C names of the model, so ``names`` gives one name per box),
    ``image_hw`` (original height, width), ``source`` (file path or ``"<array i>"``) and, for an
    input that could not be read, ``error`` (then K = 0). ``image`` optionally keeps the original
    BGR uint8 image for :meth:`plot`; for file inputs it is normally None and re-read on demand.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: tuple[str, ...] = ()
    image_hw: tuple[int, int] | None = None
    source: str | None = None
    error: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @property
    def ok(self) -> bool:
        """False when the input could not be read (see ``error``)."""
        return self.error is None

    @property
    def names(self) -> list[str]:
        """Class name of each detection (the label id as text when the model has no names)."""
        return [
            self.class_names[i] if 0 <= i < len(self.class_names) else str(i) for i in self.labels.tolist()
        ]

    def to_array(self) -> Tensor:
        """``[K, 6]`` float64 rows (x1, y1, x2, y2, score, class), the seed's ``predict`` layout."""
        return torch.cat(
            (self.boxes.double(), self.scores.double()[:, None], self.labels.double()[:, None]), dim=1
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``source``, ``height``, ``width``, ``error`` and ``detections``
        (each ``{"box": [x1, y1, x2, y2], "score", "label", "name"}``)."""
        h, w = self.image_hw if self.image_hw is not None else (None, None)
        return {
            "source": self.source,
            "height": h,
            "width": w,
            "error": self.error,
            "detections": [
                {"box": [float(v) for v in box], "score": float(score), "label": int(label), "name": name}
                for box, score, label, name in zip(
                    self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), self.names, strict=True
                )
            ],
        }

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO results entries ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.

        ``category_ids[label]`` gives the category id; by default the official COCO ids for a model
        with the 80 COCO classes, else ``label + 1``.
        """
        if category_ids is None and self.class_names in ((), COCO_CLASSES):
            category_ids = COCO_CATEGORY_IDS
        out = []
        for (x1, y1, x2, y2), score, label in zip(
            self.boxes.tolist(), self.scores.tolist(), self.labels.tolist(), strict=True
        ):
            cat = category_ids[label] if category_ids is not None else label + 1
            out.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
        return out

    def plot(
        self, image: np.ndarray | None = None, *, score_threshold: float = 0.0, thickness: int | None = None
    ) -> np.ndarray:
        """The image (``image``, else the kept ``self.image``, else re-read from ``source``) with every
        detection scoring ``>= score_threshold`` drawn; BGR uint8 ``[H, W, 3]``, input untouched."""
        from atssdet.visualize import draw_detections

        if image is None:
            image = self.image
        if image is None:
            if self.source is None or not Path(self.source).is_file():
                raise ValueError(
                    f"{self.source or 'detections'}: no image to draw on; pass plot(image=BGR array)"
                )
            from atssdet.data.image_io import read_image

            image = read_image(self.source)
        return draw_detections(
            image,
            self.boxes,
            self.scores,
            self.labels,
            self.class_names,
            score_threshold=score_threshold,
            thickness=thickness,
        )

    def save(
        self,
        path: str | os.PathLike[str],
        *,
        image: np.ndarray | None = None,
        score_threshold: float = 0.0,
    ) -> Path:
        """Write ``path`` atomically: ``.json`` -> :meth:`to_dict`; an image suffix -> :meth:`plot`."""
        from atssdet.fileio import atomic_write_bytes, atomic_write_text

        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            return atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        if suffix not in _IMAGE_SUFFIXES:
            raise ValueError(
                f"{path}: unsupported output type; use .json or one of {', '.join(_IMAGE_SUFFIXES)}"
            )
        import cv2

        drawn = self.plot(image, score_threshold=score_threshold)
        ok, encoded = cv2.imencode(suffix, drawn)
        if not ok:
            raise ValueError(f"{path}: OpenCV cannot encode {suffix} images")
        return atomic_write_bytes(path, encoded.tobytes())


def dense_scores_and_boxes(output: ATSSOutput, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
    """Scores ``[N, A, C]`` and boxes ``[N, A, 4]`` in original-image pixels.

    ``image_hw``/``orig_hw`` are ``[N, 2]`` (resized and original height, width). The score is
    ``sqrt(sigmoid(cls) * sigmoid(ctr))``; boxes are divided by the float32 ratio resized/original and
    clipped to ``[0, W] x [0, H]`` (MegEngine clips to W, not W-1).
    """
    scores = torch.sqrt(torch.sigmoid(output.cls_logits) * torch.sigmoid(output.ctr_logits)[..., None])
    boxes = ltrb_to_xyxy(output.points, output.box_ltrb)
    image_hw = image_hw.to(boxes.device, torch.float32)
    orig_hw = orig_hw.to(boxes.device, torch.float32)
    ratio_h = image_hw[:, 0] / orig_hw[:, 0]
    ratio_w = image_hw[:, 1] / orig_hw[:, 1]
    ratio = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h), dim=1)[:, None, :]  # [N, 1, 4]
    boxes = boxes / ratio
    zero = torch.zeros_like(orig_hw[:, 0])
    lo = torch.stack((zero, zero, zero, zero), dim=1)[:, None, :]
    hi = torch.stack((orig_hw[:, 1], orig_hw[:, 0], orig_hw[:, 1], orig_hw[:, 0]), dim=1)[:, None, :]
    boxes = torch.minimum(torch.maximum(boxes, lo), hi)
    return scores, boxes


def select_detections(
    scores: Tensor,
    boxes: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    class_agnostic: bool = False,
    classes: Tensor | None = None,
) -> list[Detections]:
    """Threshold, per-class NMS and top-k on dense ``scores [N, A, C]`` / ``boxes [N, A, 4]``.

    MegEngine order is kept: survivors are listed class by class (score-descending inside a class);
    only when more than ``max_detections`` survive are they stably sorted by score and cut.
    ``classes`` (optional ``[K]`` label ids) keeps only those classes.
    """
    n, _, c = scores.shape
    mask = scores > score_threshold
    if classes is not None:
        keep_class = torch.zeros(c, dtype=torch.bool, device=scores.device)
        keep_class[classes.to(scores.device)] = True
        mask &= keep_class
    results: list[Detections] = []
    # One batched_nms call per image: torchvision's CPU fallback loops over groups and scans every
    # candidate each time, so a single call keyed by (image, class) would cost O(N^2) in images.
    for i in range(n):
        anchor_idx, cls_idx = mask[i].nonzero(as_tuple=True)
        cand_scores = scores[i, anchor_idx, cls_idx]
        cand_boxes = boxes[i, anchor_idx]
        group = torch.zeros_like(cls_idx) if class_agnostic else cls_idx
        keep = batched_nms(cand_boxes.float(), cand_scores.float(), group, nms_threshold)  # score-descending
        # MegEngine lists survivors class by class; stable, so score order holds inside a class.
        keep = keep[torch.sort(cls_idx[keep], stable=True).indices]
        if keep.numel() > max_detections:
            order = torch.sort(cand_scores[keep], descending=True, stable=True).indices[:max_detections]
            keep = keep[order]
        results.append(Detections(cand_boxes[keep], cand_scores[keep], cls_idx[keep]))
    return results


def postprocess(
    output: ATSSOutput,
    image_hw: Tensor,
    orig_hw: Tensor,
    *,
    score_threshold: float = 0.05,
    nms_threshold: float = 0.6,
    max_detections: int = 100,
    class_agnostic: bool = False,
    classes: Tensor | None = None,
) -> list[Detections]:
    """Raw model output -> one :class:`Detections` per image (see :func:`select_detections`)."""
    scores, boxes = dense_scores_and_boxes(output, image_hw, orig_hw)
    return select_detections(
        scores,
        boxes,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
        classes=classes,
    )
