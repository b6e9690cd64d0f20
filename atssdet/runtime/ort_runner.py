"""The ONNX Runtime runtime: an ``atssdet export`` file behind the :class:`~atssdet.runtime.Runner` interface.

The file's metadata (written by :func:`atssdet.export.export_metadata`) carries the model config,
the class names and the options used at export. A file exported with ``--with-nms`` has those
options baked into its graph: :meth:`OrtRunner.detect` accepts exactly them and refuses others, and
it has no dense outputs (so no flip TTA). onnx and onnxruntime are optional dependencies, imported
only when a file is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from atssdet.config import ATSSConfig
from atssdet.export import METADATA_PREFIX, _require
from atssdet.options import InferenceOptions
from atssdet.runtime.torch_runner import select_with_options
from atssdet.structures import Detections

Spec = tuple[tuple[str, str, tuple[int | str, ...]], ...]


@dataclass(frozen=True)
class OnnxSignature:
    """Inputs and outputs of a graph: (name, element type, shape with symbolic dims as names)."""

    inputs: Spec
    outputs: Spec

    def __str__(self) -> str:
        def fmt(rows: Spec) -> str:
            return "\n".join(f"  {n}: {t}[{', '.join(str(d) for d in s)}]" for n, t, s in rows)

        return f"inputs:\n{fmt(self.inputs)}\noutputs:\n{fmt(self.outputs)}"


def onnx_signature(path: str | os.PathLike[str]) -> OnnxSignature:
    """Read the input/output signature of an ONNX file (element types as ONNX names, e.g. FLOAT)."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)

    def rows(values: Sequence[Any]) -> Spec:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim)
            out.append((v.name, onnx.TensorProto.DataType.Name(t.elem_type).lower(), dims))
        return tuple(out)

    return OnnxSignature(rows(proto.graph.input), rows(proto.graph.output))


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``atssdet.*`` metadata of an exported file, without the prefix."""
    onnx = _require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    return {
        p.key[len(METADATA_PREFIX) :]: p.value
        for p in proto.metadata_props
        if p.key.startswith(METADATA_PREFIX)
    }


def _to_numpy(x: Tensor | np.ndarray, dtype: type) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    return np.ascontiguousarray(arr, dtype=dtype)


def _providers(device: str | torch.device | None, available: Sequence[str]) -> list[str]:
    """ONNX Runtime execution providers for ``device`` "cpu", "cuda" (a torch device or "cuda:0"
    naming one too) or None (CUDA if offered)."""
    if device is None:
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    device = str(device).split(":")[0]
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ValueError(f"device 'cuda' requested but onnxruntime offers only {list(available)}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")


class OrtRunner:
    """Run an exported ATSS ONNX file in ONNX Runtime.

    ``device`` "cpu" or "cuda" (None: the CUDA provider if onnxruntime offers it, else the CPU)
    chooses the execution provider; input batches are always built on the CPU (:attr:`device`),
    ONNX Runtime copies them. :attr:`cfg` and :attr:`class_names` come from the file's metadata;
    :attr:`baked` holds the options stored at export (fixed inside an NMS graph).
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        meta = read_onnx_metadata(self.path)
        if "config" not in meta:
            raise ValueError(f"{self.path}: not an atssdet ONNX export (no atssdet.config metadata)")
        if meta.get("input_format") == "raw":
            raise ValueError(
                f"{self.path}: exported with --raw-input (one uint8 [H, W, 3] image in, resize inside); "
                "run it with onnxruntime directly (docs/export.md), or export without --raw-input for "
                "Detector / predict --weights"
            )
        self.metadata = meta
        self.cfg: ATSSConfig = ATSSConfig.from_json(meta["config"])
        self.class_names: tuple[str, ...] = tuple(json.loads(meta["class_names"]))
        self.with_nms = meta["outputs"] == "nms"
        self.baked = InferenceOptions(
            score_threshold=float(meta["score_threshold"]),
            nms_threshold=float(meta["nms_threshold"]),
            max_detections=int(meta["max_detections"]),
            class_agnostic=bool(json.loads(meta["class_agnostic"])),
        )
        self.providers = _providers(None if device is None else str(device), ort.get_available_providers())
        self.device = torch.device("cpu")
        self.session = ort.InferenceSession(str(self.path), providers=self.providers)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def signature(self) -> OnnxSignature:
        return onnx_signature(self.path)

    def run(
        self, images: Tensor | np.ndarray, image_hw: Tensor | np.ndarray, orig_hw: Tensor | np.ndarray
    ) -> dict[str, np.ndarray]:
        """Raw graph outputs by name (``scores``/``boxes`` or ``detections``/``num_detections``)."""
        images_np = _to_numpy(images, np.float32)
        if images_np.ndim != 4 or images_np.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W] BGR, got shape {tuple(images_np.shape)}")
        n = images_np.shape[0]
        feeds = {"images": images_np}
        for name, value in (("image_hw", image_hw), ("orig_hw", orig_hw)):
            arr = _to_numpy(value, np.float32)
            if arr.shape != (n, 2):
                raise ValueError(f"{name} must be [{n}, 2] (height, width per image), got {tuple(arr.shape)}")
            feeds[name] = arr
        outs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outs, strict=True))

    def dense(
        self, images: Tensor | np.ndarray, image_hw: Tensor | np.ndarray, orig_hw: Tensor | np.ndarray
    ) -> tuple[Tensor, Tensor]:
        """Dense ``scores [N, A, C]`` and ``boxes [N, A, 4]`` (files exported without NMS only)."""
        if self.with_nms:
            raise ValueError(
                f"{self.path}: exported with NMS; it has no dense scores/boxes outputs "
                "(flip TTA needs an ONNX file exported without --with-nms)"
            )
        out = self.run(images, image_hw, orig_hw)
        return torch.from_numpy(out["scores"]), torch.from_numpy(out["boxes"])

    def detect(
        self,
        images: Tensor | np.ndarray,
        image_hw: Tensor | np.ndarray,
        orig_hw: Tensor | np.ndarray,
        options: InferenceOptions,
    ) -> list[Detections]:
        """One :class:`Detections` (CPU tensors, labels int64) per image under ``options``.

        A dense file runs :func:`~atssdet.postprocess.select_detections` on its outputs and accepts
        any options; an NMS file accepts only :attr:`baked` (and no class filter), else ValueError.
        """
        if not self.with_nms:
            return select_with_options(*self.dense(images, image_hw, orig_hw), options)
        self._check_baked(options)
        out = self.run(images, image_hw, orig_hw)
        dets = torch.from_numpy(out["detections"])
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
