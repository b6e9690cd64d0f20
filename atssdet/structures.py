"""Plain result types: what inference returns, with no file IO, drawing or format conversion.

Drawing and saving live in :mod:`atssdet.visualize`; COCO results conversion in
:func:`atssdet.evaluation.coco.detections_to_coco` (one place, used by ``eval`` and ``predict``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(eq=False)
class Detections:
    """Detections of one image: ``boxes`` ``[K, 4]`` xyxy in original pixels, ``scores`` ``[K]``, ``labels`` ``[K]`` (0..C-1).

    :func:`~atssdet.postprocess.select_detections` fills only the three tensors.
    :class:`~atssdet.detector.Detector` also sets ``class_names`` (all C names of the model, so
    ``names`` gives one name per box), ``image_hw`` (original height, width), ``source`` (file path
    or ``"<array i>"``) and, for an input that could not be read, ``error`` (then K = 0). ``image``
    optionally keeps the original BGR uint8 ``[H, W, 3]`` image, for drawing
    (:func:`atssdet.visualize.draw`); for file inputs it is normally None.
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
