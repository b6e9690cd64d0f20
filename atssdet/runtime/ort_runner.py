"""The ONNX Runtime runtime: an ``atssdet export`` file behind the :class:`~atssdet.runtime.Runner` interface.

The file's metadata (written by :func:`atssdet.export.export_metadata`) carries the model config,
the class names and the options used at export. A file exported with ``--with-nms`` has those
options baked into its graph: :meth:`OrtRunner.detect` accepts exactly them and refuses others, and
it has no dense outputs (so no flip TTA). onnx and onnxruntime are optional dependencies, imported
only when a file is opened. A file that is not ONNX, lacks atssdet's metadata, or whose graph does
not take atssdet's inputs raises :class:`~atssdet.errors.ModelFileError` naming it.
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
from atssdet.errors import ModelFileError, is_memory_error, is_onnx_error
from atssdet.export import DENSE_OUTPUT_NAMES, INPUT_NAMES, METADATA_PREFIX, NMS_OUTPUT_NAMES, _require
from atssdet.options import InferenceOptions
from atssdet.runtime.torch_runner import select_with_options
from atssdet.structures import Detections

Spec = tuple[tuple[str, str, tuple[int | str, ...]], ...]


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _load_proto(path: str | os.PathLike[str]) -> Any:
    """The parsed ``onnx.ModelProto`` of ``path``; :class:`ModelFileError` if it is not ONNX."""
    onnx = _require("onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as exc:  # protobuf DecodeError, onnx's own errors
        raise ModelFileError(f"{path}: not a valid ONNX file ({_short(exc)})") from exc


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
    proto = _load_proto(path)

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
    proto = _load_proto(path)
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
            raise ModelFileError(f"{self.path}: invalid atssdet metadata ({_short(exc)})") from exc
        self.providers = _providers(None if device is None else str(device), ort.get_available_providers())
        self.device = torch.device("cpu")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=self.providers)
        except Exception as exc:
            if not is_onnx_error(exc):
                raise
            raise ModelFileError(f"{self.path}: ONNX Runtime cannot load the graph ({_short(exc)})") from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_graph_names()

    def _check_graph_names(self) -> None:
        """The graph's inputs and outputs must be those ``atssdet export`` writes (else ModelFileError)."""
        inputs = [i.name for i in self.session.get_inputs()]
        want_out = NMS_OUTPUT_NAMES if self.with_nms else DENSE_OUTPUT_NAMES
        if sorted(inputs) != sorted(INPUT_NAMES) or not set(want_out) <= set(self.output_names):
            raise ModelFileError(
                f"{self.path}: the graph's inputs {inputs} / outputs {self.output_names} are not those of an "
                f"atssdet export (inputs {list(INPUT_NAMES)}, outputs {list(want_out)})"
            )

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
        try:
            outs = self.session.run(self.output_names, feeds)
        except Exception as exc:
            if not is_onnx_error(exc) or is_memory_error(exc):  # out of memory: the caller retries per image
                raise
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ModelFileError(
                f"{self.path}: the graph does not accept the inputs ({shapes}): {_short(exc)}"
            ) from exc
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
