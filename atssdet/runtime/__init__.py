"""Runtimes behind one dense-prediction interface, so :class:`~atssdet.detector.Detector` never asks which it holds.

A runner turns a padded image batch into detections. ``torch_runner`` runs the PyTorch model,
``ort_runner`` an exported ONNX file in ONNX Runtime (later: OpenVINO, TensorRT). Every runner
implements :class:`Runner`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from atssdet.config import ATSSConfig
    from atssdet.options import InferenceOptions
    from atssdet.structures import Detections


class Runner(Protocol):
    """What :class:`~atssdet.detector.Detector` needs from a model, whatever executes it.

    Inputs of both methods: ``images`` float32 BGR 0..255 ``[N, 3, H, W]`` zero-padded to a multiple
    of 32 (un-normalised: normalisation is part of the model), on :attr:`device`; ``image_hw``
    ``[N, 2]`` the resized (unpadded) sizes and ``orig_hw`` ``[N, 2]`` the original sizes, float32.
    """

    cfg: ATSSConfig  # the model's config (class names, test sizes, test_* defaults)
    device: torch.device  # where input batches must be built

    def dense(self, images: Tensor, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
        """Scores ``[N, A, C]`` and boxes ``[N, A, 4]`` xyxy in original pixels, before thresholding/NMS.

        Raises ValueError naming the model when the runtime has no dense outputs (an NMS export).
        """
        ...

    def detect(
        self, images: Tensor, image_hw: Tensor, orig_hw: Tensor, options: InferenceOptions
    ) -> list[Detections]:
        """One :class:`Detections` per image (boxes, scores, labels only; CPU tensors) under ``options``.

        ``options.flip_tta`` is the caller's business (it needs :meth:`dense`); a runner ignores it.
        Raises ValueError naming the model when it cannot honour ``options`` (e.g. an NMS export
        with other thresholds baked in).
        """
        ...
