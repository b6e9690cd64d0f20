"""Lower-precision ONNX exports: fp16 and int8 (static QDQ) from the fp32 graph, and what int8 needs.

- :func:`calibration_feeds`: the calibration images of ``--calibration DIR``, read and resized
  exactly as :class:`~atssdet.detector.Detector` does (``read_image``, ``resize_shortest_edge``,
  ``images_to_batch``), as graph feeds ``{images, image_hw, orig_hw}``. Also NNCF's dataset.
- :func:`convert_fp16`: ONNX Runtime's own fp16 converter (``onnxruntime.transformers.float16``)
  with float32 inputs/outputs and :data:`FP16_KEEP_OPS` left in float32.
- :func:`quantize_int8`: ``onnxruntime.quantization.quantize_static``, QDQ, per-channel int8 weights,
  uint8 activations, MinMax calibration, convolutions only (the decoding stays float).
- :func:`int8_sensitivity`: the per-layer sensitivity pass: ONNX Runtime's ``qdq_loss_debug`` compares
  each convolution's weights and output in the fp32 and the int8 graph (signal-to-quantization-noise
  ratio, dB); the least robust layers are the ones ``--keep-float N`` leaves in float.

Everything here is onnxruntime's tooling; only the glue (which images, which layers) is ours.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atssdet import validate
from atssdet.config import ATSSConfig
from atssdet.data.image_io import read_image
from atssdet.data.transforms import images_to_batch, resize_shortest_edge
from atssdet.errors import ImageReadError, OptionError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_CALIBRATION_IMAGES = 300
# Ops left in float32 by the fp16 export (measured on the demo model, docs/export.md "fp16"): the
# GroupNorm of the head (exported as InstanceNormalization: its variance of 256-channel sums
# overflows/loses digits in fp16) and the decoding after the head (exp of the box regression and the
# sqrt of the score products, whose sizes reach 1e3-1e4 px where fp16 steps are 0.5-8 px).
FP16_KEEP_OPS = ("InstanceNormalization", "Exp", "Sqrt", "Sigmoid", "Mul", "Add", "Sub", "Div", "Max", "Min")
Feeds = dict[str, np.ndarray]


def check_precision(fmt: str, precision: str, supported: Sequence[str]) -> str:
    """``precision`` if ``fmt`` can do it, else :class:`OptionError` naming both and what it can do."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision not in supported:
        raise OptionError(
            f"precision {precision!r}: --format {fmt} cannot run it (it does {', '.join(supported)})"
        )
    return precision


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise OptionError(f"--calibration {folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def calibration_feeds(folder: str | os.PathLike[str], cfg: ATSSConfig, count: int) -> list[Feeds]:
    """Up to ``count`` images of ``folder`` (sorted, recursive; unreadable files skipped) as feeds.

    Each image is a batch of one, resized to the config's test size like :class:`Detector` does.
    :class:`OptionError` naming the folder when it holds no readable image.
    """
    count = validate.count("calibration_images", count)
    folder = Path(folder)
    files = _image_files(folder)
    feeds: list[Feeds] = []
    skipped: list[str] = []
    for path in files:
        if len(feeds) >= count:
            break
        try:
            image = read_image(path)
        except ImageReadError as exc:
            skipped.append(str(exc))
            continue
        resized = resize_shortest_edge(image, cfg.test_image_short_size, cfg.test_image_max_size)
        feeds.append(
            {
                "images": images_to_batch([resized]).numpy(),
                "image_hw": np.array([resized.shape[:2]], dtype=np.float32),
                "orig_hw": np.array([image.shape[:2]], dtype=np.float32),
            }
        )
    if not feeds:
        why = f"; e.g. {skipped[0]}" if skipped else ""
        raise OptionError(
            f"--calibration {folder}: no readable image among its {len(files)} files{why} "
            "(int8 export calibrates on real images: give a folder of JPEG/PNG files like the ones it will see)"
        )
    return feeds


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds (rewindable)."""

    def __init__(self, feeds: Sequence[Feeds]) -> None:
        self.feeds = list(feeds)
        self._it: Iterator[Feeds] = iter(self.feeds)

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def _reader(feeds: Sequence[Feeds]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):  # ORT checks the base class
        pass

    return Reader(feeds)


def convert_fp16(src: str | os.PathLike[str], dst: str | os.PathLike[str], keep_ops: Sequence[str]) -> None:
    """``src`` (fp32 ONNX) -> ``dst`` in fp16, float32 inputs/outputs, ``keep_ops`` left in float32."""
    import onnx
    from onnxruntime.transformers import float16

    proto = onnx.load(str(src))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(keep_ops))
    converted = float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=block)
    onnx.save(converted, str(dst))


def preprocess_for_int8(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """ONNX Runtime's recommended pre-processing before quantization (shape inference, constant
    folding); no symbolic shape inference: the graph's dynamic sizes come from Shape ops."""
    from onnxruntime import quantization as q

    q.quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def quantize_int8(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    feeds: Sequence[Feeds],
    keep_float: Sequence[str] = (),
    *,
    symmetric: bool = False,
) -> None:
    """``src`` (fp32 ONNX after :func:`preprocess_for_int8`) -> ``dst`` int8 QDQ: per-channel int8 weights, uint8 activations (MinMax over
    ``feeds``), every convolution but ``keep_float`` (node names) quantized; the rest stays float.

    ``symmetric``: int8 activations with zero point 0, the only QDQ form TensorRT builds from.
    """
    from onnxruntime import quantization as q

    q.quantize_static(
        str(src),
        str(dst),
        _reader(feeds),
        quant_format=q.QuantFormat.QDQ,
        per_channel=True,
        activation_type=q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8,
        weight_type=q.QuantType.QInt8,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=list(keep_float),
        calibrate_method=q.CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
    )


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's int8 robustness: SQNR (dB, higher is better) of its weights and its output(s).

    ``nodes``: the ONNX convolutions that share the layer's weights (the head runs each of its
    convolutions once per FPN level); keeping a layer in float keeps all of them.
    """

    nodes: tuple[str, ...]
    weight_sqnr: float
    output_sqnr: float

    @property
    def sqnr(self) -> float:
        return min(self.weight_sqnr, self.output_sqnr)


def int8_sensitivity(
    fp32: str | os.PathLike[str], int8: str | os.PathLike[str], feeds: Sequence[Feeds]
) -> list[LayerSensitivity]:
    """Every quantized layer of ``int8`` (a :func:`quantize_int8` of ``fp32``), least robust first.

    Uses ``onnxruntime.quantization.qdq_loss_debug``: weight SQNR from the QDQ weights, output SQNR
    from the activations of both graphs on ``feeds`` (a few images suffice: every tensor of both
    graphs is kept in memory); a layer scores the worst of its convolutions.
    """
    from onnxruntime.quantization import qdq_loss_debug as dbg

    # create_weight_matching logs an error for each weight shared by several convolutions (the head's
    # levels), which it cannot pair; those layers are ranked by their outputs alone.
    logging.disable(logging.ERROR)
    try:
        weight_err = dbg.compute_weight_error(dbg.create_weight_matching(str(fp32), str(int8)))
    finally:
        logging.disable(logging.NOTSET)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, model in (("fp32", fp32), ("int8", int8)):
            aug = Path(tmp) / f"{name}.onnx"
            dbg.modify_model_output_intermediate_tensors(str(model), str(aug), save_as_external_data=False)
            paths.append(aug)
        fp_acts = dbg.collect_activations(str(paths[0]), _reader(feeds))
        q_acts = dbg.collect_activations(str(paths[1]), _reader(feeds))
    act_err = dbg.compute_activation_error(dbg.create_activation_matching(q_acts, fp_acts))
    layers: dict[str, list[tuple[str, float, float]]] = {}
    for node, inputs, outputs in _conv_io(fp32):
        w = weight_err.get(inputs[1], np.inf)
        a = act_err.get(outputs[0], {}).get("qdq_err", np.inf)
        layers.setdefault(inputs[1], []).append((node, float(w), float(a)))
    out = [
        LayerSensitivity(tuple(n for n, _, _ in rows), min(w for _, w, _ in rows), min(a for _, _, a in rows))
        for rows in layers.values()
        if any(np.isfinite(w) or np.isfinite(a) for _, w, a in rows)  # else: not quantized at all
    ]
    return sorted(out, key=lambda s: s.sqnr)


def _conv_io(path: str | os.PathLike[str]) -> list[tuple[str, list[str], list[str]]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [(n.name, list(n.input), list(n.output)) for n in graph.node if n.op_type == "Conv"]


def format_sensitivity(rows: Sequence[LayerSensitivity], kept: int, top: int = 10) -> str:
    """The ``top`` least robust layers as a text table; the first ``kept`` are marked kept in float."""
    lines = ["int8 sensitivity (SQNR dB, lower = more quantization noise; * = kept in float):"]
    for i, s in enumerate(rows[:top]):
        mark = "*" if i < kept else " "
        where = s.nodes[0] + (f" (+{len(s.nodes) - 1} sharing its weights)" if len(s.nodes) > 1 else "")
        lines.append(f" {mark} weights {s.weight_sqnr:6.1f}  output {s.output_sqnr:6.1f}  {where}")
    return "\n".join(lines)
