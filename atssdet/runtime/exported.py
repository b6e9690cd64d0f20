"""What every exported-file runner shares: the ``atssdet.*`` metadata and dense/NMS outputs -> Detections.

:class:`ExportedRunner` reads the metadata :func:`atssdet.export.export_metadata` writes (config,
class names, the options baked into an NMS graph) and turns the graph's outputs into
:class:`~atssdet.structures.Detections`; a subclass (:class:`~atssdet.runtime.ort_runner.OrtRunner`,
:class:`~atssdet.runtime.ov_runner.OvRunner`) only opens the file and runs it (:meth:`_infer`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from atssdet.config import ATSSConfig
from atssdet.errors import ModelFileError
from atssdet.export import DENSE_OUTPUT_NAMES, INPUT_NAMES, NMS_OUTPUT_NAMES
from atssdet.options import InferenceOptions
from atssdet.runtime.torch_runner import select_with_options
from atssdet.structures import Detections

ArrayLike = Tensor | np.ndarray


def short_error(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 300 characters of message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def to_numpy(x: ArrayLike, dtype: type) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=dtype)


class ExportedRunner:
    """Base of the runners of exported files: metadata, input checks, dense/NMS outputs -> Detections.

    :attr:`cfg` and :attr:`class_names` come from the file's metadata; :attr:`baked` holds the
    options stored at export (fixed inside an NMS graph); :attr:`precision` the export precision.
    """

    path: Path
    output_names: list[str]
    device: torch.device

    def _read_metadata(self, meta: dict[str, str], kind: str) -> None:
        """Fill :attr:`cfg`, :attr:`baked` etc. from ``meta``; ModelFileError when it is not atssdet's."""
        if "config" not in meta:
            raise ModelFileError(f"{self.path}: not an atssdet {kind} export (no atssdet.config metadata)")
        if meta.get("input_format") == "raw":
            raise ModelFileError(
                f"{self.path}: exported with --raw-input (one uint8 [H, W, 3] image in, resize inside); "
                "run it with onnxruntime directly (docs/export.md), or export without --raw-input for "
                "Detector / predict --weights"
            )
        self.metadata = meta
        try:
            self.cfg: ATSSConfig = ATSSConfig.from_json(meta["config"])
            self.class_names: tuple[str, ...] = tuple(json.loads(meta["class_names"]))
            self.with_nms = meta["outputs"] == "nms"
            self.baked = InferenceOptions(
                score_threshold=float(meta["score_threshold"]),
                nms_threshold=float(meta["nms_threshold"]),
                max_detections=int(meta["max_detections"]),
                class_agnostic=bool(json.loads(meta["class_agnostic"])),
            )
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ModelFileError(f"{self.path}: invalid atssdet metadata ({short_error(exc)})") from exc
        self.precision: str = meta.get("precision", "fp32")

    def _check_names(self, inputs: list[str]) -> None:
        """The graph's inputs and outputs must be those ``atssdet export`` writes (else ModelFileError)."""
        want_out = NMS_OUTPUT_NAMES if self.with_nms else DENSE_OUTPUT_NAMES
        if sorted(inputs) != sorted(INPUT_NAMES) or not set(want_out) <= set(self.output_names):
            raise ModelFileError(
                f"{self.path}: the graph's inputs {inputs} / outputs {self.output_names} are not those of an "
                f"atssdet export (inputs {list(INPUT_NAMES)}, outputs {list(want_out)})"
            )

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on checked ``feeds``: its outputs by name (the subclass's runtime)."""
        raise NotImplementedError

    def run(self, images: ArrayLike, image_hw: ArrayLike, orig_hw: ArrayLike) -> dict[str, np.ndarray]:
        """Raw graph outputs by name (``scores``/``boxes`` or ``detections``/``num_detections``)."""
        images_np = to_numpy(images, np.float32)
        if images_np.ndim != 4 or images_np.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] BGR, got shape {tuple(images_np.shape)}")
        n = images_np.shape[0]
        feeds = {"images": images_np}
        for name, value in (("image_hw", image_hw), ("orig_hw", orig_hw)):
            arr = to_numpy(value, np.float32)
            if arr.shape != (n, 2):
                raise ValueError(f"{name} must be [{n}, 2] (height, width per image), got {tuple(arr.shape)}")
            feeds[name] = arr
        return self._infer(feeds)

    def dense(self, images: ArrayLike, image_hw: ArrayLike, orig_hw: ArrayLike) -> tuple[Tensor, Tensor]:
        """Dense ``scores [N, A, C]`` and ``boxes [N, A, 4]`` (files exported without NMS only)."""
        if self.with_nms:
            raise ValueError(
                f"{self.path}: exported with NMS; it has no dense scores/boxes outputs "
                "(flip TTA needs a file exported without --with-nms)"
            )
        out = self.run(images, image_hw, orig_hw)
        return torch.from_numpy(out["scores"]), torch.from_numpy(out["boxes"])

    def detect(
        self, images: ArrayLike, image_hw: ArrayLike, orig_hw: ArrayLike, options: InferenceOptions
    ) -> list[Detections]:
        """One :class:`Detections` (CPU tensors, labels int64) per image under ``options``.

        A dense file runs :func:`~atssdet.postprocess.select_detections` on its outputs and accepts
        any options; an NMS file accepts only :attr:`baked` (and no class filter), else ValueError.
        """
        if not self.with_nms:
            return select_with_options(*self.dense(images, image_hw, orig_hw), options)
        self._check_baked(options)
        out = self.run(images, image_hw, orig_hw)
        dets = torch.from_numpy(np.ascontiguousarray(out["detections"], dtype=np.float32))
        nums = out["num_detections"].tolist()
        return [
            Detections(d[:k, :4], d[:k, 4], d[:k, 5].to(torch.int64)) for d, k in zip(dets, nums, strict=True)
        ]

    def _check_baked(self, options: InferenceOptions) -> None:
        for name in ("score_threshold", "nms_threshold", "max_detections", "class_agnostic"):
            want, baked = getattr(options, name), getattr(self.baked, name)
            if want != baked:
                raise ValueError(
                    f"{self.path}: {name}={want!r} differs from the value baked into this NMS export "
                    f"({baked!r}); re-export, or export without --with-nms"
                )
        if options.classes is not None:
            raise ValueError(f"{self.path}: class filtering needs an export without --with-nms")
