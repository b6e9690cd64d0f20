"""The ONNX Runtime runtime: an ``atssdet export`` file behind the :class:`~atssdet.runtime.Runner` interface.

The file's metadata (written by :func:`atssdet.export.export_metadata`) carries the model config,
the class names and the options used at export. A file exported with ``--with-nms`` has those
options baked into its graph: :meth:`OrtRunner.detect` accepts exactly them and refuses others, and
it has no dense outputs (so no flip TTA). onnx and onnxruntime are optional dependencies, imported
only when a file is opened. A file that is not ONNX, lacks atssdet's metadata, or whose graph does
not take atssdet's inputs raises :class:`~atssdet.errors.ModelFileError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atssdet.errors import ModelFileError, is_memory_error, is_onnx_error
from atssdet.export import METADATA_PREFIX, _require
from atssdet.runtime.exported import ExportedRunner, short_error

Spec = tuple[tuple[str, str, tuple[int | str, ...]], ...]


def _load_proto(path: str | os.PathLike[str]) -> Any:
    """The parsed ``onnx.ModelProto`` of ``path``; :class:`ModelFileError` if it is not ONNX."""
    onnx = _require("onnx")
    try:
        return onnx.load(str(path), load_external_data=False)
    except OSError:
        raise
    except Exception as exc:  # protobuf DecodeError, onnx's own errors
        raise ModelFileError(f"{path}: not a valid ONNX file ({short_error(exc)})") from exc


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


class OrtRunner(ExportedRunner):
    """Run an exported ATSS ONNX file in ONNX Runtime.

    ``device`` "cpu" or "cuda" (None: the CUDA provider if onnxruntime offers it, else the CPU)
    chooses the execution provider; input batches are always built on the CPU (:attr:`device`),
    ONNX Runtime copies them. :attr:`cfg` and :attr:`class_names` come from the file's metadata;
    :attr:`baked` holds the options stored at export (fixed inside an NMS graph). fp16 and int8
    exports (``export --precision``) run the same way: their inputs and outputs stay float32.
    """

    def __init__(self, path: str | os.PathLike[str], *, device: str | torch.device | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        self._read_metadata(read_onnx_metadata(self.path), "ONNX")
        self.providers = _providers(None if device is None else str(device), ort.get_available_providers())
        self.device = torch.device("cpu")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=self.providers)
        except Exception as exc:
            if not is_onnx_error(exc):
                raise
            raise ModelFileError(
                f"{self.path}: ONNX Runtime cannot load the graph ({short_error(exc)})"
            ) from exc
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._check_names([i.name for i in self.session.get_inputs()])

    def signature(self) -> OnnxSignature:
        return onnx_signature(self.path)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self.output_names, feeds)
        except Exception as exc:
            if not is_onnx_error(exc) or is_memory_error(exc):  # out of memory: the caller retries per image
                raise
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ModelFileError(
                f"{self.path}: the graph does not accept the inputs ({shapes}): {short_error(exc)}"
            ) from exc
        return dict(zip(self.output_names, outs, strict=True))
