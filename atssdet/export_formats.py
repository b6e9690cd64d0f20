"""``atssdet export`` for every format and precision: ONNX fp32/fp16/int8, OpenVINO IR, TensorRT engine.

:func:`export_model` traces the model once to fp32 ONNX (:func:`atssdet.export.export_onnx`) and
derives the rest from that graph: fp16/int8 ONNX (:mod:`atssdet.export_quant`), the OpenVINO IR
(:mod:`atssdet.export_openvino`), the TensorRT engine (:mod:`atssdet.export_tensorrt`). The
written file carries the ``atssdet.*`` metadata plus ``precision`` (and, for int8, the layers kept
in float and the number of calibration images).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from atssdet import validate
from atssdet.batching import padded_size
from atssdet.errors import OptionError
from atssdet.export import COMMAND, METADATA_PREFIX, _require, export_onnx
from atssdet.export_openvino import OPENVINO_PRECISIONS, save_openvino
from atssdet.export_quant import (
    DEFAULT_CALIBRATION_IMAGES,
    FP16_KEEP_OPS,
    Feeds,
    calibration_feeds,
    check_precision,
    convert_fp16,
    format_sensitivity,
    int8_sensitivity,
    preprocess_for_int8,
    quantize_int8,
)
from atssdet.export_tensorrt import TENSORRT_PRECISIONS, build_engine, require_tensorrt
from atssdet.fileio import atomic_path
from atssdet.guard import OutputGuard
from atssdet.modeling.atss import ATSS
from atssdet.runtime.ov_runner import weights_file

FORMATS: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32", "fp16", "int8"),  # ONNX Runtime's CPU provider has no bf16 convolutions
    "openvino": OPENVINO_PRECISIONS,
    "tensorrt": TENSORRT_PRECISIONS,
}
SENSITIVITY_IMAGES = 8  # images of the per-layer pass (it keeps every activation of both graphs)


def output_files(fmt: str, out: str | os.PathLike[str]) -> list[Path]:
    """The files an export to ``out`` writes (an IR is ``.xml`` + ``.bin``)."""
    out = Path(out)
    return [out, weights_file(out)] if fmt == "openvino" else [out]


def check_request(
    fmt: str,
    precision: str,
    out: str | os.PathLike[str],
    *,
    calibration: object,
    raw_input: bool,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    keep_float: int = 0,
) -> None:
    """Refuse, before any work, what an export cannot do (:class:`OptionError` naming the input)."""
    validate.count("calibration_images", calibration_images)
    validate.count("keep_float", keep_float, minimum=0)
    if fmt not in FORMATS:
        raise OptionError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_precision(fmt, precision, FORMATS[fmt])
    suffix = {"onnx": ".onnx", "openvino": ".xml"}.get(fmt)
    if suffix is not None and Path(out).suffix != suffix:
        raise OptionError(
            f"--out {out}: an {fmt} export is a {suffix} file (predict/eval choose the runtime by it)"
        )
    if precision == "int8" and calibration is None:
        raise OptionError("--precision int8 needs --calibration DIR (a folder of representative images)")
    if raw_input and (fmt, precision) != ("onnx", "fp32"):
        raise OptionError(
            "--raw-input: only an fp32 ONNX export (its in-graph resize is bit-exact uint8 math)"
        )
    if fmt == "tensorrt":
        require_tensorrt()


def export_model(
    model: ATSS,
    out: str | os.PathLike[str],
    *,
    format: str = "onnx",
    precision: str = "fp32",
    calibration: str | os.PathLike[str] | None = None,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    keep_float: int = 0,
    overwrite: bool = False,
    report: Callable[[str], None] = print,
    **onnx_options: Any,
) -> Path:
    """Export ``model`` to ``out`` as ``format`` ("onnx", "openvino", "tensorrt") at ``precision``.

    ``calibration``: folder of images for int8 (the first ``calibration_images`` readable ones);
    ``keep_float``: leave the N convolutions the int8 sensitivity pass ranks least robust in float
    (the ranking is reported through ``report``). ``onnx_options`` go to :func:`export_onnx`
    (``with_nms``, thresholds, ``dynamic``, ``example_hw``, ``raw_input``, ...).
    """
    check_request(
        format,
        precision,
        out,
        calibration=calibration,
        raw_input=onnx_options.get("raw_input", False),
        calibration_images=calibration_images,
        keep_float=keep_float,
    )
    OutputGuard(COMMAND, overwrite=overwrite).check(output_files(format, out))
    if (format, precision) == ("onnx", "fp32"):
        return export_onnx(model, out, overwrite=overwrite, **onnx_options)
    feeds: list[Feeds] = []
    if precision == "int8":
        assert calibration is not None
        feeds = calibration_feeds(calibration, model.cfg, calibration_images)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", **onnx_options)
        meta = _metadata(fp32) | {"precision": precision}
        kept: list[str] = []
        pre = fp32
        if precision == "int8":
            pre = Path(tmp) / "fp32_pre.onnx"
            preprocess_for_int8(fp32, pre)
            kept = _sensitive_layers(
                pre, Path(tmp), feeds, keep_float, report, symmetric=format == "tensorrt"
            )
            meta |= {"kept_float": json.dumps(kept), "calibration_images": str(len(feeds))}
        if format == "openvino":
            return save_openvino(fp32, out, precision=precision, metadata=meta, feeds=feeds, keep_float=kept)
        src = fp32
        if precision == "fp16":
            src = Path(tmp) / "fp16.onnx"
            convert_fp16(fp32, src, FP16_KEEP_OPS)
        elif precision == "int8":
            src = Path(tmp) / "int8.onnx"
            quantize_int8(pre, src, feeds, kept, symmetric=format == "tensorrt")
        if format == "tensorrt":
            side = model.cfg.test_image_max_size  # the longest side a test image can have, padded to /32
            return build_engine(src, out, precision=precision, max_hw=padded_size(side, side))
        return _save_with_metadata(src, out, meta)


def _metadata(path: Path) -> dict[str, str]:
    from atssdet.runtime.ort_runner import read_onnx_metadata

    return read_onnx_metadata(path)


def _sensitive_layers(
    fp32: Path,
    tmp: Path,
    feeds: Sequence[Feeds],
    keep_float: int,
    report: Callable[[str], None],
    *,
    symmetric: bool,
) -> list[str]:
    """The ``keep_float`` least robust convolutions (the ranking is reported), or none for 0."""
    if keep_float == 0:
        return []
    plain = tmp / "int8_plain.onnx"
    quantize_int8(fp32, plain, feeds, symmetric=symmetric)
    ranking = int8_sensitivity(fp32, plain, feeds[:SENSITIVITY_IMAGES])
    kept = [node for layer in ranking[:keep_float] for node in layer.nodes]
    report(format_sensitivity(ranking, keep_float, top=max(10, keep_float)))
    return kept


def _save_with_metadata(src: Path, out: str | os.PathLike[str], meta: dict[str, str]) -> Path:
    """``src`` with ``meta`` as its ``atssdet.*`` metadata, written atomically to ``out``.

    Not ``onnx.checker``-checked: the fp16 converter appends its input casts at the end of the node
    list (ONNX Runtime sorts the graph itself); the fp32 graph it came from was checked at export.
    """
    onnx = _require("onnx")
    proto = onnx.load(str(src))
    others = {p.key: p.value for p in proto.metadata_props if not p.key.startswith(METADATA_PREFIX)}
    onnx.helper.set_model_props(proto, others | {METADATA_PREFIX + k: v for k, v in meta.items()})
    with atomic_path(out, mark=COMMAND) as tmp:
        onnx.save(proto, str(tmp))
    return Path(out)
