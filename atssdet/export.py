"""ONNX export of ATSS (decoding and optionally NMS inside the graph); run exports with :mod:`atssdet.runtime.ort_runner`.

The exported graph takes the same inputs as the PyTorch pipeline::

    images    [N, 3, H, W] float32, raw BGR 0-255 (resized, zero-padded to the batch maximum;
              the graph pads further to a multiple of 32 and normalises, like :class:`ATSS`)
    image_hw  [N, 2] float32, resized (height, width) of each image inside the batch
    orig_hw   [N, 2] float32, original (height, width) each image's boxes are mapped back to

and returns either dense decoded predictions (``scores [N, A, C]``, ``boxes [N, A, 4]`` xyxy in
original pixels, exactly :func:`atssdet.postprocess.dense_scores_and_boxes`) or, with
``with_nms=True``, final detections (``detections [N, K, 6]`` rows (x1, y1, x2, y2, score, class),
zero-padded to ``K = max_detections``, plus ``num_detections [N]``) in the order of
:func:`atssdet.postprocess.select_detections`. What is traced is the model's own forward
(:mod:`atssdet.export_graph`).

onnx and onnxruntime are optional (``pip install atssdet[export]``) and imported only here, lazily.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from atssdet.config import ATSSConfig
from atssdet.export_graph import ExportGraph, RawInputGraph
from atssdet.fileio import atomic_path
from atssdet.guard import OutputGuard
from atssdet.modeling.atss import ATSS, SIZE_DIVISIBILITY
from atssdet.options import InferenceOptions

INPUT_NAMES = ("images", "image_hw", "orig_hw")
RAW_INPUT_NAME = "image"  # --raw-input graphs: one uint8 [H, W, 3] BGR image
DENSE_OUTPUT_NAMES = ("scores", "boxes")
NMS_OUTPUT_NAMES = ("detections", "num_detections")
METADATA_PREFIX = "atssdet."
COMMAND = "export"  # the written-by mark of exported files (atssdet.guard)


# Which optional extra brings each lazily imported package.
_EXTRAS = {"onnx": "export", "onnxruntime": "export", "openvino": "deploy", "nncf": "deploy"}


def _require(module: str) -> Any:
    """Import an optional dependency or fail with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRAS.get(module, "export")
        what = "ONNX export/inference" if extra == "export" else "OpenVINO export/inference"
        raise ImportError(
            f"{what} needs the optional package {module!r}: pip install 'atssdet[{extra}]'"
        ) from exc


def _input_convention(cfg: ATSSConfig, raw_input: bool) -> dict[str, Any]:
    """What the graph expects of its inputs (the ``input_convention`` metadata entry)."""
    if raw_input:
        return {
            "image": "uint8 [H, W, 3] BGR, one image of any size (what cv2.imread returns)",
            "channel_order": "BGR",
            "resize": f"inside the graph: shortest edge {cfg.test_image_short_size}, max "
            f"{cfg.test_image_max_size}, bit-exact cv2.INTER_LINEAR on uint8",
            "pad_inside_graph": True,
            "normalize_inside_graph": True,
            "boxes": "in the input image's pixels",
            "batch": 1,
        }
    return {
        "images": "float32 [N, 3, H, W] raw BGR 0-255, resized, zero-padded bottom/right to the batch maximum",
        "image_hw": "float32 [N, 2] resized (height, width)",
        "orig_hw": "float32 [N, 2] original (height, width); boxes come out in these pixels",
        "channel_order": "BGR",
        "pixel_range": [0, 255],
        "pad_to_multiple": SIZE_DIVISIBILITY,
        "pad_inside_graph": True,
        "pad_value": 0.0,
        "normalize_inside_graph": True,
        "mean": list(cfg.img_mean),
        "std": list(cfg.img_std),
        "resize": f"shortest edge {cfg.test_image_short_size}, max {cfg.test_image_max_size}, "
        "cv2.INTER_LINEAR on uint8 (outside the graph)",
    }


def export_metadata(
    cfg: ATSSConfig,
    options: InferenceOptions,
    *,
    with_nms: bool,
    model_name: str | None = None,
    raw_input: bool = False,
) -> dict[str, str]:
    """The ``metadata_props`` written into the ONNX file (all values are strings, JSON where structured).

    The post-processing entries carry :class:`InferenceOptions` names: ``score_threshold``,
    ``nms_threshold``, ``max_detections``, ``class_agnostic`` (baked into an NMS graph; the defaults
    of a dense one).
    """
    from atssdet import __version__

    meta = {
        "atssdet_version": __version__,
        "model_name": model_name or "",
        "class_names": json.dumps(list(cfg.class_names)),
        "input_convention": json.dumps(_input_convention(cfg, raw_input)),
        "mean": json.dumps(list(cfg.img_mean)),
        "std": json.dumps(list(cfg.img_std)),
        "strides": json.dumps(list(cfg.stride)),
        "config": cfg.to_json(),
        "outputs": "nms" if with_nms else "dense",
        "score_threshold": repr(options.score_threshold),
        "nms_threshold": repr(options.nms_threshold),
        "max_detections": str(options.max_detections),
        "class_agnostic": json.dumps(options.class_agnostic),
        "input_format": "raw" if raw_input else "resized",
    }
    return {METADATA_PREFIX + k: v for k, v in meta.items()}


def default_example_hw(*, dynamic: bool, raw_input: bool) -> tuple[int, int]:
    """The example size traced when none is given: 800x1333 for a fixed-size graph (the size it
    then takes), else 213x160 (padded to 224x160, so the Pad op is traced) and for ``raw_input`` a
    24x1000 strip.

    Tracing runs the model once on the example. Inside a raw-input graph a 213x160 image becomes
    1066x800, and where every (point, class) pair passes the score threshold (random or barely
    trained weights) NMS then sorts out 1.4 M candidates: 45 s of a 60 s export. The strip resizes
    to 32x1333 (73 k pairs at most) and still traces every op, the resize and padding included.
    """
    if not dynamic:
        return (800, 1333)
    return (24, 1000) if raw_input else (213, 160)


def _example_inputs(example_hw: tuple[int, int], raw_input: bool, device: torch.device) -> tuple[Tensor, ...]:
    """Random inputs to trace with: ``(images, image_hw, orig_hw)``, or ``(image,)`` uint8 for raw input."""
    h, w = example_hw
    gen = torch.Generator().manual_seed(0)
    if raw_input:
        return ((torch.rand((h, w, 3), generator=gen) * 255).to(device=device, dtype=torch.uint8),)
    images = (torch.rand((1, 3, h, w), generator=gen) * 255).to(device)
    image_hw = torch.tensor([[h, w]], dtype=torch.float32, device=device)
    orig_hw = torch.tensor([[2 * h, 2 * w]], dtype=torch.float32, device=device)
    return images, image_hw, orig_hw


def _dynamic_axes(*, with_nms: bool, raw_input: bool) -> dict[str, dict[int, str]]:
    """The symbolic axes of a dynamic export (a raw-input graph has batch 1 everywhere)."""
    if raw_input:
        axes = {RAW_INPUT_NAME: {0: "height", 1: "width"}}
        if not with_nms:
            axes |= {"scores": {1: "anchors"}, "boxes": {1: "anchors"}}
        return axes
    axes = {
        "images": {0: "batch", 2: "height", 3: "width"},
        "image_hw": {0: "batch"},
        "orig_hw": {0: "batch"},
    }
    if with_nms:
        return axes | {"detections": {0: "batch"}, "num_detections": {0: "batch"}}
    return axes | {"scores": {0: "batch", 1: "anchors"}, "boxes": {0: "batch", 1: "anchors"}}


def _trace_to_onnx(
    graph: nn.Module,
    example_inputs: tuple[Tensor, ...],
    path: str,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]] | None,
    opset: int,
) -> None:
    """``torch.onnx.export`` with the TorchScript exporter, silencing the warnings tracing ATSS expects."""
    with torch.no_grad(), warnings.catch_warnings():
        # Expected while tracing: pad_to_multiple's branch is fixed on purpose (see export_onnx) and
        # every index tensor is non-negative.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script. is deprecated.*")
        # dynamo=False on purpose: the torch.export exporter needs onnxscript (an extra dependency).
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*The feature will be removed.*")
        torch.onnx.export(
            graph,
            example_inputs,
            path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _fix_output_dims(proto: Any, *, num_classes: int, with_nms: bool, raw_input: bool) -> None:
    """Declare the output dims the exporter leaves symbolic although the model fixes them."""
    if raw_input:
        # One image in, so the batch axis of every output is 1.
        for output in proto.graph.output:
            batch_dim = output.type.tensor_type.shape.dim[0]
            batch_dim.Clear()
            batch_dim.dim_value = 1
    if not with_nms:
        class_dim = proto.graph.output[0].type.tensor_type.shape.dim[2]
        class_dim.Clear()
        class_dim.dim_value = num_classes


def export_onnx(
    model: ATSS,
    path: str | os.PathLike[str],
    *,
    dynamic: bool = True,
    with_nms: bool = False,
    opset: int = 17,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    example_hw: tuple[int, int] | None = None,
    model_name: str | None = None,
    raw_input: bool = False,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` to ONNX at ``path`` (written atomically) and return the path.

    An existing ``path`` that ``export`` did not write is refused (:class:`atssdet.guard.OutputError`)
    unless ``overwrite``.

    Inputs ``images [N, 3, H, W]``, ``image_hw [N, 2]``, ``orig_hw [N, 2]`` (see the module doc).
    Outputs ``scores [N, A, C]``, ``boxes [N, A, 4]``; with ``with_nms`` ``detections [N, K, 6]`` and
    ``num_detections [N]`` (int64), K = ``max_detections``. The options default to
    ``InferenceOptions.from_config(model.cfg)`` and are validated by it (:class:`OptionError`).
    ``dynamic`` makes N, H, W (and A) symbolic; otherwise the graph is fixed to ``example_hw`` and
    batch 1. Uses the TorchScript exporter (``dynamo=False``), which needs no extra packages.

    ``raw_input``: the graph takes one ``image`` uint8 ``[H, W, 3]`` BGR of any size instead and does
    the test resize itself, bit-exactly as ``cv2.resize`` (see :class:`RawInputGraph`); outputs keep
    their names with batch 1. ``example_hw`` is then the example image's size. ``example_hw``
    defaults to :func:`default_example_hw`.
    """
    onnx = _require("onnx")
    OutputGuard(COMMAND, overwrite=overwrite).check([path])
    cfg = model.cfg
    if cfg.numerics != "torch":
        raise ValueError(
            f"numerics={cfg.numerics!r} computes GroupNorm with NumPy and cannot be traced to ONNX; "
            "export the model built with numerics='torch' (same weights)"
        )
    options = InferenceOptions.from_config(
        cfg,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
    )
    if example_hw is None:
        example_hw = default_example_hw(dynamic=dynamic, raw_input=raw_input)
    if dynamic and example_hw[0] % SIZE_DIVISIBILITY == 0 and example_hw[1] % SIZE_DIVISIBILITY == 0:
        # pad_to_multiple skips the pad when there is nothing to pad, so the example must need one
        # for the Pad op to be traced at all.
        raise ValueError(
            f"example_hw {example_hw}: at least one side must not be a multiple of {SIZE_DIVISIBILITY}"
        )
    graph: nn.Module = ExportGraph(model, nms=options if with_nms else None).eval()
    if raw_input:
        graph = RawInputGraph(graph, cfg.test_image_short_size, cfg.test_image_max_size).eval()
    path = Path(path)
    with atomic_path(path, mark=COMMAND) as tmp_path:
        _trace_to_onnx(
            graph,
            _example_inputs(example_hw, raw_input, next(model.parameters()).device),
            str(tmp_path),
            input_names=[RAW_INPUT_NAME] if raw_input else list(INPUT_NAMES),
            output_names=list(NMS_OUTPUT_NAMES if with_nms else DENSE_OUTPUT_NAMES),
            dynamic_axes=_dynamic_axes(with_nms=with_nms, raw_input=raw_input) if dynamic else None,
            opset=opset,
        )
        proto = onnx.load(str(tmp_path))
        meta = export_metadata(cfg, options, with_nms=with_nms, model_name=model_name, raw_input=raw_input)
        onnx.helper.set_model_props(proto, meta)
        _fix_output_dims(proto, num_classes=cfg.num_classes, with_nms=with_nms, raw_input=raw_input)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp_path))
    return path
