"""The PyTorch runtime: an :class:`~atssdet.modeling.atss.ATSS` module behind the :class:`~atssdet.runtime.Runner` interface."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from atssdet import validate
from atssdet.distributed import resolve_device
from atssdet.postprocess import dense_scores_and_boxes, select_detections
from atssdet.structures import Detections

if TYPE_CHECKING:
    from atssdet.config import ATSSConfig
    from atssdet.modeling.atss import ATSS
    from atssdet.options import InferenceOptions


def select_with_options(scores: Tensor, boxes: Tensor, options: InferenceOptions) -> list[Detections]:
    """:func:`~atssdet.postprocess.select_detections` on dense ``scores [N, A, C]`` / ``boxes [N, A, 4]``
    under ``options`` (``flip_tta`` is not a selection option and is ignored here)."""
    classes = None if options.classes is None else torch.tensor(options.classes, dtype=torch.long)
    return select_detections(
        scores,
        boxes,
        score_threshold=options.score_threshold,
        nms_threshold=options.nms_threshold,
        max_detections=options.max_detections,
        class_agnostic=options.class_agnostic,
        classes=classes,
    )


class TorchRunner:
    """Runs ``model`` (moved to ``device`` and put in eval mode) in PyTorch.

    ``device`` is checked by :func:`atssdet.validate.device` (a device type atssdet runs on, available
    here) and resolved by :func:`atssdet.distributed.resolve_device` (None: CUDA when available, else
    the CPU).
    """

    def __init__(self, model: ATSS, *, device: str | torch.device | None = None) -> None:
        self.device: torch.device = resolve_device(validate.device(device))
        self.model = model.to(self.device).eval()
        self.cfg: ATSSConfig = model.cfg

    def dense(self, images: Tensor, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``[N, A, C]`` and boxes ``[N, A, 4]`` (original pixels), see :class:`~atssdet.runtime.Runner`."""
        return dense_scores_and_boxes(self.model(images), image_hw, orig_hw)

    def detect(
        self, images: Tensor, image_hw: Tensor, orig_hw: Tensor, options: InferenceOptions
    ) -> list[Detections]:
        """One :class:`~atssdet.structures.Detections` per image (CPU tensors) under ``options``."""
        dets = select_with_options(*self.dense(images, image_hw, orig_hw), options)
        return [Detections(d.boxes.cpu(), d.scores.cpu(), d.labels.cpu()) for d in dets]
