"""OpenVINO IR export: ``openvino.convert_model`` of the ONNX export; int8 through NNCF post-training quantization.

The IR is the ONNX graph (decoding, optionally NMS, inside) converted by OpenVINO's own converter, so
there is one traced graph for every backend. ``fp16`` stores fp16 weights (``compress_to_fp16``),
``bf16`` fp32 weights marked to run in bf16 on CPUs that have it, ``int8`` runs
``nncf.quantize`` over the calibration feeds (:func:`atssdet.export_quant.calibration_feeds`, the
same preprocessing as :class:`~atssdet.detector.Detector`), with the convolutions named in
``keep_float`` left in float (NNCF's ``IgnoredScope``). The ``atssdet.*`` metadata goes into the
model's ``rt_info`` (read back by :class:`~atssdet.runtime.ov_runner.OvRunner`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from atssdet.export import COMMAND, _require
from atssdet.export_quant import Feeds
from atssdet.fileio import atomic_copy
from atssdet.runtime.ov_runner import RT_INFO_KEY, weights_file

OPENVINO_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
QUANTIZED_TYPES = ("Convolution",)  # what NNCF may quantize in an int8 IR


def save_openvino(
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    precision: str,
    metadata: dict[str, str],
    feeds: Sequence[Feeds] = (),
    keep_float: Sequence[str] = (),
) -> Path:
    """Convert ``onnx_path`` to the IR ``out`` (``.xml``, ``.bin`` beside it) at ``precision``.

    ``metadata``: the ``atssdet.*`` entries without prefix (stored in ``rt_info``). ``feeds`` and
    ``keep_float`` (ONNX Conv node names) are for ``int8``. Both files are written through
    :mod:`atssdet.fileio` (temp + rename), the ``.bin`` first.
    """
    ov = _require("openvino")
    model = ov.convert_model(str(onnx_path))
    if precision == "int8":
        nncf = _require("nncf")
        # Convolutions only, as for ONNX Runtime: NNCF's default also quantizes the inputs of the
        # element-wise ops, GroupNorm (MVN) and the box decoding, which cost the demo model 41 of
        # its 59 mAP points (docs/export.md). OpenVINO names a convolution with a bias
        # "<onnx name>/WithoutBiases".
        others = sorted({op.get_type_name() for op in model.get_ops()} - set(QUANTIZED_TYPES))
        patterns = [re.escape(name) + "(/WithoutBiases)?" for name in keep_float]
        scope = nncf.IgnoredScope(types=others, patterns=patterns, validate=False)
        log = logging.getLogger("nncf")
        level = log.level
        log.setLevel(logging.WARNING)  # NNCF lists every ignored node at INFO: hundreds of lines
        try:
            model = nncf.quantize(
                model, nncf.Dataset(list(feeds)), subset_size=len(feeds), ignored_scope=scope
            )
        finally:
            log.setLevel(level)
    model.set_rt_info(json.dumps(metadata), [RT_INFO_KEY])
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        xml = Path(tmp) / out.name
        # save_model compresses weights to fp16 unless told otherwise.
        ov.save_model(model, str(xml), compress_to_fp16=precision == "fp16")
        atomic_copy(weights_file(xml), weights_file(out), mark=COMMAND)
        atomic_copy(xml, out, mark=COMMAND)
    return out
