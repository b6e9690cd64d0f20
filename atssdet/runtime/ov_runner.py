"""The OpenVINO runtime: an ``atssdet export --format openvino`` IR (``.xml`` + ``.bin``) behind the Runner interface.

The IR holds the same graph as the ONNX export (decoding, optionally NMS, inside) and the same
``atssdet.*`` metadata, stored in the model's ``rt_info`` (:data:`RT_INFO_KEY`, one JSON object).
openvino is optional (``pip install 'atssdet[deploy]'``) and imported only when a file is opened.

Precision: OpenVINO's CPU plugin computes in bf16 by default on CPUs that have it (AVX512-BF16,
AMX), which moves boxes by about 0.25 px on the reference model; :class:`OvRunner` asks for f32
(``INFERENCE_PRECISION_HINT``) unless the IR was exported with ``--precision bf16``. fp16 IRs store
fp16 weights and compute in f32 on CPUs (the CPU plugin has no fp16 arithmetic on x86); int8 IRs
run their quantized convolutions in int8 (VNNI) and the rest in f32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atssdet.errors import ModelFileError, OptionError, is_memory_error
from atssdet.export import DENSE_OUTPUT_NAMES, INPUT_NAMES, NMS_OUTPUT_NAMES, _require
from atssdet.runtime.exported import ExportedRunner, short_error

RT_INFO_KEY = "atssdet_metadata"  # rt_info entry of the IR: the export metadata as one JSON object


def weights_file(xml: Path) -> Path:
    """The ``.bin`` that holds the weights of the IR ``xml`` (OpenVINO's naming: same stem)."""
    return xml.with_suffix(".bin")


def read_ir_metadata(model: Any) -> dict[str, str]:
    """The ``atssdet.*`` metadata of an OpenVINO model read from an exported IR (without the prefix)."""
    if not model.has_rt_info([RT_INFO_KEY]):
        return {}
    meta: dict[str, str] = json.loads(model.get_rt_info([RT_INFO_KEY]).astype(str))
    return meta


def _port_name(port: Any) -> str:
    """The name atssdet gave a graph input/output (OpenVINO may attach several tensor names to a port)."""
    names = port.get_names()
    return next(
        (n for n in (*INPUT_NAMES, *DENSE_OUTPUT_NAMES, *NMS_OUTPUT_NAMES) if n in names), port.get_any_name()
    )


def _ov_device(device: str | torch.device | None) -> str:
    name = "cpu" if device is None else str(device).split(":")[0]
    if name != "cpu":
        raise OptionError(f"device {str(device)!r}: atssdet runs OpenVINO IRs on the CPU only (device 'cpu')")
    return "CPU"


class OvRunner(ExportedRunner):
    """Run an exported OpenVINO IR on the CPU; same outputs and options as :class:`OrtRunner`.

    ``path``: the ``.xml`` (its ``.bin`` beside it). ``threads``: CPU threads (default: OpenVINO's,
    all cores). Missing ``.bin``, an unreadable IR or one without atssdet's metadata raise
    :class:`ModelFileError` naming the file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        device: str | torch.device | None = None,
        threads: int | None = None,
    ) -> None:
        ov = _require("openvino")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such OpenVINO IR file")
        if not weights_file(self.path).is_file():
            raise ModelFileError(
                f"{weights_file(self.path)}: no such file: the weights of the OpenVINO IR {self.path} "
                "(export writes the .xml and .bin side by side; copy both)"
            )
        self.device = torch.device("cpu")
        target = _ov_device(device)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            meta = read_ir_metadata(model)
        except Exception as exc:  # OpenVINO raises RuntimeError for a malformed XML or .bin
            raise ModelFileError(f"{self.path}: OpenVINO cannot read the IR ({short_error(exc)})") from exc
        self._read_metadata(meta, "OpenVINO")
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32"}
        if self.precision == "bf16" and "BF16" not in core.get_property(target, "OPTIMIZATION_CAPABILITIES"):
            raise OptionError(f"{self.path}: exported for bf16, but this CPU has no bf16 arithmetic")
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = core.compile_model(model, target, config)
        except Exception as exc:
            if is_memory_error(exc):
                raise
            raise ModelFileError(f"{self.path}: OpenVINO cannot compile the IR ({short_error(exc)})") from exc
        self.output_names = [_port_name(o) for o in self.compiled.outputs]
        self._check_names([_port_name(i) for i in self.compiled.inputs])

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self.compiled.create_infer_request()  # one per call: the runner may be shared by threads
        try:
            result = request.infer(feeds)
        except Exception as exc:
            if is_memory_error(exc):
                raise
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
            raise ModelFileError(
                f"{self.path}: the IR does not accept the inputs ({shapes}): {short_error(exc)}"
            ) from exc
        return {_port_name(port): np.array(value) for port, value in result.items()}
