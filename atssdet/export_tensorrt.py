"""TensorRT engine export (fp32, fp16, int8) from the ONNX export, on a CUDA machine with TensorRT.

The engine is built by TensorRT's ONNX parser from the same graph as every other backend. int8 uses
explicit quantization: the graph is first quantized by :func:`atssdet.export_quant.quantize_int8`
with symmetric int8 activations (TensorRT's QDQ form), so the calibration images, the per-layer
``keep_float`` and the preprocessing are those of the ONNX int8 export. Refused with
:class:`OptionError` where CUDA or the ``tensorrt`` package is missing (docs/export.md "TensorRT").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atssdet.errors import ModelFileError, OptionError
from atssdet.export import COMMAND
from atssdet.fileio import atomic_path

TENSORRT_PRECISIONS = ("fp32", "fp16", "int8")


def require_tensorrt() -> Any:
    """The ``tensorrt`` module on a machine with a CUDA GPU, else :class:`OptionError` saying what is missing."""
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            "--format tensorrt: needs a CUDA GPU and there is none here (torch.cuda.is_available() is "
            "False); export --format onnx here and build the engine on the GPU machine (docs/export.md)"
        )
    try:
        import tensorrt
    except ImportError as exc:
        raise OptionError(
            "--format tensorrt: needs the tensorrt package (pip install tensorrt, on the CUDA machine)"
        ) from exc
    return tensorrt


def build_engine(
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str,
    max_hw: tuple[int, int],
    max_batch: int = 8,
    workspace_gib: float = 4.0,
) -> Path:
    """Build a TensorRT engine of ``onnx_path`` (an fp32 graph, or an int8 QDQ one) and write it to ``out``.

    One optimisation profile: batch 1..``max_batch``, images up to ``max_hw`` (optimised for batch 1
    at ``max_hw``). ``precision`` "fp16" lets TensorRT pick fp16 kernels; "int8" expects QDQ nodes.
    """
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ModelFileError(f"{onnx_path}: TensorRT cannot parse the graph ({errors[:500]})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)  # the layers kept out of int8 may still use fp16
    h, w = max_hw
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, 32, 32), (1, 3, h, w), (max_batch, 3, h, w))
    for name in ("image_hw", "orig_hw"):
        profile.set_shape(name, (1, 2), (1, 2), (max_batch, 2))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ModelFileError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    with atomic_path(out, mark=COMMAND) as tmp:
        tmp.write_bytes(bytes(engine))
    return Path(out)
