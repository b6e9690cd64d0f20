"""A SAHI ``DetectionModel`` backed by an atssdet :class:`~atssdet.detector.Detector`.

For SAHI users who want its slicing, merging and tooling with an ATSS model::

    from sahi.predict import get_sliced_prediction
    from atssdet.integrations.sahi_model import AtssdetDetectionModel

    model = AtssdetDetectionModel(model_path="model.safetensors", confidence_threshold=0.3)
    result = get_sliced_prediction("big.jpg", model, slice_height=640, slice_width=640, batch_size=8)

``model_path`` is a checkpoint (:meth:`Detector.from_checkpoint`; ``config_path`` names the zoo
architecture of a ``.pkl``) or, without a file, a zoo name (official weights); ``model=`` takes a
ready :class:`Detector`. SAHI passes RGB arrays; they are turned to BGR for the Detector.
:meth:`perform_batch_inference` runs SAHI's slice batches through :meth:`Detector.predict` as one
batch (equal-size slices share one forward pass). atssdet's own batched slicing needs none of this
(:mod:`atssdet.slicing`); this module needs ``sahi`` (installed ``--no-deps``: it declares
``opencv-python``; see the ``sahi`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sahi.models.base import DetectionModel
from sahi.prediction import ObjectPrediction

from atssdet.detector import Detector
from atssdet.structures import Detections


class AtssdetDetectionModel(DetectionModel):
    """SAHI's model interface for atssdet; ``image_size`` (if given) is the test short side."""

    def load_model(self) -> None:
        path = self.model_path
        size, device = self.image_size or None, self._device_arg
        if path is not None and Path(path).exists():
            det = Detector.from_checkpoint(path, model=self.config_path, device=device, short_size=size)
        else:
            det = Detector.from_pretrained(str(path or self.config_path), device=device, short_size=size)
        self.set_model(det)

    def set_model(self, model: Any, **kwargs: Any) -> None:
        if not isinstance(model, Detector):
            raise TypeError(f"AtssdetDetectionModel needs an atssdet Detector, got {type(model).__name__}")
        self.model = model
        self.options = model.options.replace(score_threshold=float(self.confidence_threshold))
        if not self.category_mapping:
            self.category_mapping = {str(i): n for i, n in enumerate(model.cfg.class_names)}

    def set_device(self, device: str | None = None) -> None:
        self._device_arg = device  # the Detector resolves it (atssdet.distributed.resolve_device)
        self.device = device if device is not None else "auto"

    def perform_inference(self, image: np.ndarray) -> None:
        self.perform_batch_inference([image])

    def perform_batch_inference(self, images: list[np.ndarray]) -> None:
        bgr = [np.ascontiguousarray(im[..., ::-1]) for im in images]  # SAHI's arrays are RGB
        self._original_predictions = self.model.predict(bgr, batch_size=len(bgr), options=self.options)
        self._original_shapes = [im.shape for im in images]

    @property
    def num_categories(self) -> int:
        return len(self.model.cfg.class_names)

    @property
    def has_mask(self) -> bool:
        return False

    @property
    def category_names(self) -> list[str]:
        return list(self.model.cfg.class_names)

    def _create_object_prediction_list_from_original_predictions(
        self,
        shift_amount_list: list[list[int | float]] | None = None,
        full_shape_list: list[list[int | float]] | None = None,
    ) -> None:
        results: list[Detections] = self._original_predictions
        shifts = shift_amount_list or [[0, 0]] * len(results)
        if shifts and not isinstance(shifts[0], list):  # SAHI's single-image form [x, y]
            shifts = [list(shifts)] * len(results)
        shapes = full_shape_list if full_shape_list is not None else [None] * len(results)
        if shapes and shapes[0] is not None and not isinstance(shapes[0], list):
            shapes = [list(shapes)] * len(results)
        assert self.category_mapping is not None
        per_image = []
        for det, shift, shape in zip(results, shifts, shapes, strict=True):
            if det.error is not None:
                raise ValueError(det.error)
            per_image.append(
                [
                    ObjectPrediction(
                        bbox=box,
                        category_id=int(label),
                        category_name=self.category_mapping[str(int(label))],
                        score=float(score),
                        shift_amount=list(shift),
                        full_shape=None if shape is None else list(shape),
                    )
                    for box, score, label in zip(
                        det.boxes.tolist(), det.scores.tolist(), det.labels.tolist(), strict=True
                    )
                ]
            )
        self._object_prediction_list_per_image = per_image
