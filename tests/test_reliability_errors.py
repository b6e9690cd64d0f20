"""Issue 14, items 3, 5, 6 (acceptance 1 and 4 without the server): the reliability case table.

Four kinds, each a table of named cases run through ``atssdet.cli.main`` in-process:

* ``TRACEBACKS``: inputs that used to end in a Python traceback and now end as
  ``atssdet CMD: error: <input>: <problem>`` with exit status 2 (or, bf16 weights, simply work);
* ``MISLEADING``: inputs whose message used to name the wrong problem (a FIFO or a symlink loop
  as "no such file", a 15000 x 15000 image as 2147483648 x 2147483648, ...);
* ``SILENT``: values that used to be accepted and gave wrong results (``--max-detections -5``,
  a negative learning rate, a 100000 px resize, ...): refused, naming the value;
* ``ISOLATION``: one image that used to take the others down (a 1 x 10000 PNG, a corrupt file, an
  image that runs out of memory): ``predict``, ``eval`` and ``train`` finish every other image and
  report the bad one.

Every case asserts the exit status, that stderr/stdout name the input and the problem, that no
traceback was printed, and that every file present before the command (the shared inputs and the
case's own folder) is byte-identical after it. A fault that cannot be produced by a file (running
out of memory, a CUDA machine) is injected with ``monkeypatch`` in the ``setup`` of its case.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

import atssdet.data.transforms as transforms
from atssdet.cli import main
from atssdet.config import ATSSConfig
from atssdet.convert import save_safetensors
from atssdet.errors import ImageReadError
from atssdet.export import METADATA_PREFIX, export_metadata
from atssdet.modeling.atss import build_model
from atssdet.options import InferenceOptions
from tests.coco_synth import TINY_CFG
from tests.conftest import R18, REFERENCE_DIR
from tests.helpers import snapshot_files, tiff_header

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RNG = np.random.default_rng(0)
# name -> (height, width): the acceptance-4 mix; "corrupt.png" is added as a broken file.
VALID_IMAGES = {"ok.png": (60, 80), "thin.png": (1, 10000), "thin3.png": (3, 4000), "ok2.png": (50, 50)}


def _gif_header(width: int, height: int) -> bytes:
    """A GIF whose screen and first frame declare ``width x height`` (one tiny LZW block)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return screen + frame + b"\x02\x02\x4c\x01\x00\x3b"


def _coco(names: list[str]) -> dict[str, Any]:
    images, annotations = [], []
    for i, name in enumerate(names, start=1):
        h, w = VALID_IMAGES.get(name, (30, 30))
        images.append({"id": i, "file_name": name, "height": h, "width": w})
        box = [0, 0, max(1, w // 2), max(1, h // 2)]
        annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 3, "bbox": box, "iscrowd": 0,
                            "area": box[2] * box[3]})  # fmt: skip
    categories = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def _onnx_file(
    path: Path, *, inputs: dict[str, list[int]], outputs: tuple[str, ...], meta: dict[str, str]
) -> None:
    """A small ONNX graph (each output an Identity of the first input) with ``atssdet.*`` metadata."""
    import onnx
    from onnx import TensorProto, helper

    first = next(iter(inputs))
    graph = helper.make_graph(
        [helper.make_node("Identity", [first], [name]) for name in outputs],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The shared inputs (read-only for every case): weights, images, annotation files, model files."""
    root = tmp_path_factory.mktemp("assets")
    images = root / "imgs"
    images.mkdir()
    for name, (h, w) in VALID_IMAGES.items():
        cv2.imwrite(str(images / name), RNG.integers(0, 255, (h, w, 3), dtype=np.uint8))
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a PNG" * 4)
    torch.manual_seed(0)
    state = build_model(TINY_CFG).state_dict()
    save_safetensors(state, root / "tiny.safetensors", cfg=TINY_CFG)
    from safetensors.torch import save_file

    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(root / "bf16.safetensors"),
              metadata={"atssdet_config": TINY_CFG.to_json()})  # fmt: skip
    small = {"w": torch.zeros(1)}
    save_file(small, str(root / "deep.safetensors"), metadata={"atssdet_config": "[" * 5000 + "]" * 5000})
    huge = json.loads(TINY_CFG.to_json()) | {"test_image_short_size": 100000}
    save_file(small, str(root / "huge-size.safetensors"), metadata={"atssdet_config": json.dumps(huge)})
    (root / "mixed.json").write_text(json.dumps(_coco([*VALID_IMAGES, "corrupt.png"])))
    (root / "ok.json").write_text(json.dumps(_coco(["ok.png", "ok2.png"])))
    (root / "junk.onnx").write_bytes(b"this is not a protobuf \xff\xfe" * 8)
    meta = export_metadata(TINY_CFG, InferenceOptions.from_config(TINY_CFG), with_nms=False)
    _onnx_file(root / "renamed.onnx", inputs={"input": [1, 3, 64, 64]}, outputs=("out",), meta=meta)
    fixed = {"images": [1, 3, 64, 64], "image_hw": [1, 2], "orig_hw": [1, 2]}
    _onnx_file(root / "fixed-shape.onnx", inputs=fixed, outputs=("scores", "boxes"), meta=meta)
    _onnx_file(
        root / "bad-meta.onnx",
        inputs=fixed,
        outputs=("scores", "boxes"),
        meta={**meta, METADATA_PREFIX + "config": "{bad"},
    )
    (root / "plain-file").write_text("a file where a folder is expected\n")
    return {"root": root, "images": images}


@dataclass
class Ctx:
    """What a case's ``setup`` works with: its own folder, the monkeypatch, the shared images."""

    tmp: Path
    mp: pytest.MonkeyPatch
    images: Path
    trained: list[str] = field(default_factory=list)  # file names the training dataset returned
    stops: list[threading.Event] = field(default_factory=list)  # helper threads to end after the case


@dataclass
class Case:
    """``atssdet ARGV`` must exit with ``status`` and print every fragment of ``expect``. In both,
    ``{root}`` is the shared inputs' folder, ``{images}`` the shared images, ``{tmp}`` the case's folder."""

    argv: list[str]
    status: int
    expect: list[str]
    setup: Callable[[Ctx], None] | None = None  # the case's own files, injected faults
    check: Callable[[Ctx, str], None] | None = None  # more assertions on the outputs and messages
    needs_reference: bool = False


def _predict(*paths: str, out: str = "{tmp}/out", weights: str = "{root}/tiny.safetensors") -> list[str]:
    return ["predict", *paths, "--weights", weights, "--out", out, "--no-progress"]


def _eval(data: str = "{root}/ok.json", images: str = "{images}", out: str = "{tmp}/e/r.json") -> list[str]:
    return ["eval", "--weights", "{root}/tiny.safetensors", "--data", data, "--images", images, "--out", out,
            "--no-progress", "--workers", "1"]  # fmt: skip


def _train(data: str = "{root}/ok.json", out: str = "{tmp}/train") -> list[str]:
    return ["train", "--finetune", "{root}/tiny.safetensors", "--data", data, "--images", "{images}",
            "--out", out, "--device", "cpu", "--batch-size", "2", "--workers", "0", "--no-progress",
            "--set", "train_image_short_size=[64]", "--set", "train_image_max_size=96"]  # fmt: skip


def _link_images(ctx: Ctx, *names: str) -> Path:
    """``{tmp}/imgs`` holding links to the shared images ``names``."""
    folder = ctx.tmp / "imgs"
    folder.mkdir(exist_ok=True)
    for name in names:
        os.symlink(ctx.images / name, folder / name)
    return folder


def _fifo(ctx: Ctx) -> None:
    fifo = _link_images(ctx, "ok.png") / "fifo.png"
    os.mkfifo(fifo)
    (ctx.tmp / "data.json").write_text(json.dumps(_coco(["ok.png", "fifo.png"])))
    # Were the reader to block on the FIFO (the bug), a writer opening and closing it after a while
    # ends its read with EOF: the case then fails on its message instead of hanging the suite.
    stop = threading.Event()

    def unblock() -> None:
        while not stop.wait(0.5):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads it
            except OSError:
                continue
            if stop.wait(20):
                return

    threading.Thread(target=unblock, daemon=True).start()
    ctx.stops.append(stop)


def _symlink_loop(ctx: Ctx) -> None:
    folder = _link_images(ctx, "ok.png")
    os.symlink(folder / "b.png", folder / "loop.png")
    os.symlink(folder / "loop.png", folder / "b.png")
    (ctx.tmp / "data.json").write_text(json.dumps(_coco(["ok.png", "loop.png"])))


def _huge_header_images(ctx: Ctx) -> None:
    (ctx.tmp / "big.tif").write_bytes(tiff_header(15000, 15000))
    (ctx.tmp / "big.gif").write_bytes(_gif_header(15000, 15000))


def _folder(ctx: Ctx) -> None:
    (ctx.tmp / "folder").mkdir()


def _no_cuda(ctx: Ctx) -> None:
    ctx.mp.setattr(torch.cuda, "is_available", lambda: False)


def _one_cuda_device(ctx: Ctx) -> None:
    ctx.mp.setattr(torch.cuda, "is_available", lambda: True)
    ctx.mp.setattr(torch.cuda, "device_count", lambda: 1)


def _raise(exc: BaseException) -> Any:
    raise exc


def _load_runs_out_of_memory(ctx: Ctx) -> None:
    import atssdet.loader

    ctx.mp.setattr(atssdet.loader, "load_runner", lambda *args, **kwargs: _raise(MemoryError()))


def _pycocotools_refuses(ctx: Ctx) -> None:
    """Scoring reaches pycocotools with data it asserts against (as a corrupt ground truth would)."""
    from pycocotools.coco import COCO

    import atssdet.evaluation.loop as loop

    ctx.mp.setattr(loop, "run_cocoeval", lambda data, results, image_ids: COCO().loadRes("not a list"))


def _memory_error_when(predicate: Callable[[torch.Tensor, torch.Tensor], bool]) -> Callable[[Ctx], None]:
    """The PyTorch runner raises MemoryError on batches where ``predicate(image_hw, orig_hw)`` (``[N, 2]``) holds."""

    def setup(ctx: Ctx) -> None:
        from atssdet.runtime.torch_runner import TorchRunner

        real = TorchRunner.detect

        def detect(
            self: Any, images: Any, image_hw: torch.Tensor, orig_hw: torch.Tensor, options: Any
        ) -> Any:
            if predicate(image_hw, orig_hw):
                raise MemoryError()
            return real(self, images, image_hw, orig_hw, options)

        ctx.mp.setattr(TorchRunner, "detect", detect)

    return setup


def _has_orig(h: int, w: int) -> Callable[[torch.Tensor, torch.Tensor], bool]:
    return lambda image_hw, orig_hw: bool(((orig_hw[:, 0] == h) & (orig_hw[:, 1] == w)).any())


def _batch_of_two_runs_out_of_memory(ctx: Ctx) -> None:
    _memory_error_when(lambda image_hw, orig_hw: len(image_hw) > 1)(ctx)
    (ctx.tmp / "copy.png").write_bytes((ctx.images / "ok.png").read_bytes())


def _decode_runs_out_of_memory(ctx: Ctx) -> None:
    """cv2.imdecode raises MemoryError on the bytes of the 3 x 4000 PNG alone."""
    size = (ctx.images / "thin3.png").stat().st_size
    real = cv2.imdecode
    ctx.mp.setattr(
        cv2, "imdecode", lambda buf, flags: _raise(MemoryError()) if len(buf) == size else real(buf, flags)
    )


def _cv2_error_on(shape: tuple[int, int], module: Any, name: str, message: str) -> Callable[[Ctx], None]:
    """``module.name(image, ...)`` raises ``cv2.error(message)`` on an image of ``shape`` alone."""

    def setup(ctx: Ctx) -> None:
        real = getattr(module, name)

        def wrapped(image: np.ndarray, *args: Any) -> Any:
            if image.shape[:2] == shape:
                raise cv2.error(message)
            return real(image, *args)

        ctx.mp.setattr(module, name, wrapped)

    return setup


def _check_predicted(*done: str, failed: tuple[str, ...] = ()) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, text: str) -> None:
        doc = json.loads((ctx.tmp / "out" / "predictions.json").read_text())
        assert sorted(Path(r["file"]).name for r in doc["images"]) == sorted(done)
        assert all(len(r["detections"]) > 0 for r in doc["images"])  # real detections for every valid image
        assert sorted(Path(f["file"]).name for f in doc["failed"]) == sorted(failed)

    return check


def _check_eval(num_images: int, *failed: str) -> Callable[[Ctx, str], None]:
    def check(ctx: Ctx, text: str) -> None:
        metrics = json.loads((ctx.tmp / "e" / "r.metrics.json").read_text())
        assert metrics["num_images"] == num_images, metrics
        assert len(metrics["failed_images"]) == len(failed), metrics["failed_images"]
        for name, reason in zip(failed, sorted(metrics["failed_images"]), strict=True):
            assert name in reason

    return check


def _record_trained(ctx: Ctx) -> None:
    """Record the file name of every item the training dataset returns (DataLoader workers: 0)."""
    from atssdet.data.coco import COCODetection

    real = COCODetection.__getitem__

    def getitem(self: COCODetection, key: Any) -> Any:
        item = real(self, key)
        ctx.trained.append(self.image_path(int(key[0] if isinstance(key, tuple) else key)).name)
        return item

    ctx.mp.setattr(COCODetection, "__getitem__", getitem)


def _transform_fails_on_thin3(ctx: Ctx) -> None:
    _cv2_error_on((3, 4000), transforms, "resize_image_and_boxes", _CV2_ASSERT)(ctx)
    _record_trained(ctx)


def _check_trained(*skipped: str) -> Callable[[Ctx, str], None]:
    """Training finished, every valid image was trained on, and each skip (logged and counted) is
    one of the ``skipped`` files."""

    def check(ctx: Ctx, text: str) -> None:
        assert (ctx.tmp / "train" / "model_final.safetensors").is_file()
        assert set(ctx.trained) == set(VALID_IMAGES) - set(skipped), ctx.trained
        warnings = [line for line in text.splitlines() if "skipping unreadable image" in line]
        assert warnings and all(any(name in w for name in skipped) for w in warnings), warnings
        log = [json.loads(line) for line in (ctx.tmp / "train" / "train_log.jsonl").read_text().splitlines()]
        assert [r for r in log if "skipped_images" in r][-1]["skipped_images"] == len(warnings)

    return check


# ------------------------------------------------------------------ tracebacks -> atssdet CMD: error

TRACEBACKS: dict[str, Case] = {
    "predict-out-is-a-file": Case(
        _predict("{images}/ok.png", out="{root}/plain-file"),
        2,
        ["plain-file: exists and is a file, not a folder"],
    ),
    "predict-out-below-a-file": Case(
        _predict("{images}/ok.png", out="{root}/plain-file/sub"),
        2,
        ["plain-file/sub", "plain-file is a file, not a folder"],
    ),  # fmt: skip
    "predict-short-size-0": Case(
        [*_predict("{images}/ok.png"), "--short-size", "0"],
        2,
        ["short_size=0: expected an integer in [1, 8192]"],
    ),
    "predict-device-cuda-without-cuda": Case(
        [*_predict("{images}/ok.png"), "--device", "cuda"],
        2,
        ["--device 'cuda': CUDA is not available"],
        setup=_no_cuda,
    ),  # fmt: skip
    "predict-device-meta": Case(
        [*_predict("{images}/ok.png"), "--device", "meta"], 2, ["--device 'meta'", "runs on cpu, cuda, mps"]
    ),
    "predict-device-mps-unavailable": Case(
        [*_predict("{images}/ok.png"), "--device", "mps"], 2, ["--device 'mps'", "MPS is not available"]
    ),
    "predict-garbage-onnx": Case(
        _predict("{images}/ok.png", weights="{root}/junk.onnx"), 2, ["junk.onnx: not a valid ONNX file"]
    ),
    "predict-onnx-of-another-graph": Case(
        _predict("{images}/ok.png", weights="{root}/renamed.onnx"),
        2,
        ["renamed.onnx: the graph's inputs ['input']", "not those of an atssdet export"],
    ),  # fmt: skip
    "predict-onnx-shape-mismatch": Case(
        _predict("{images}/ok.png", weights="{root}/fixed-shape.onnx"),
        2,
        ["fixed-shape.onnx: the graph does not accept the inputs", "images [1, 3, 96, 128]"],
    ),  # fmt: skip
    "predict-bfloat16-safetensors-loads": Case(
        _predict("{images}/ok.png", weights="{root}/bf16.safetensors"),
        0,
        ["ok.png", "1 image(s) done, 0 failed"],
        check=_check_predicted("ok.png"),
    ),  # fmt: skip
    "predict-safetensors-config-nested-deeply": Case(
        _predict("{images}/ok.png", weights="{root}/deep.safetensors"),
        2,
        ["deep.safetensors: invalid atssdet_config metadata", "nested too deeply"],
    ),  # fmt: skip
    "predict-out-of-memory": Case(
        _predict("{images}/ok.png"),
        2,
        ["atssdet predict: error: out of memory", "--batch-size"],
        setup=_load_runs_out_of_memory,
    ),  # fmt: skip
    "eval-out-is-a-folder": Case(
        _eval(out="{tmp}/folder"),
        2,
        ["{tmp}/folder: is a folder, not a file"],
        setup=_folder,
    ),  # fmt: skip
    "eval-out-below-a-file": Case(
        _eval(out="{root}/plain-file/r.json"), 2, ["plain-file: exists and is a file, not a folder"]
    ),
    "eval-set-nested-too-deeply": Case(
        [*_eval(), "--set", "extra=" + "[" * 3000 + "]" * 3000], 2, ["--set extra: value nested too deeply"]
    ),
    "eval-device-meta": Case(
        [*_eval(), "--device", "meta"], 2, ["--device 'meta'", "runs on cpu, cuda, mps"]
    ),
    "eval-pycocotools-refuses": Case(
        _eval(), 2, ["ok.json: pycocotools cannot score it", "KeyError"], setup=_pycocotools_refuses
    ),
    "data-synth-out-is-a-file": Case(
        [
            "data",
            "synth",
            "--out",
            "{root}/plain-file",
            "--num-train",
            "1",
            "--num-val",
            "1",
            "--no-progress",
        ],
        2,
        ["plain-file is a file, not a folder"],
    ),  # fmt: skip
    "train-out-is-a-file": Case(
        _train(out="{root}/plain-file"), 2, ["plain-file: exists and is a file, not a folder"]
    ),
    "convert-to-a-folder": Case(
        ["convert", f"{REFERENCE_DIR}/{R18}.seed0.pkl.gz", "{tmp}/folder", "--model", R18],
        2,
        ["{tmp}/folder: is a folder, not a file"],
        setup=_folder,
        needs_reference=True,
    ),  # fmt: skip
}

# ------------------------------------------------------------------ misleading messages

MISLEADING: dict[str, Case] = {
    "eval-image-is-a-fifo": Case(
        _eval(data="{tmp}/data.json", images="{tmp}/imgs"),
        0,
        [
            "fifo.png: cannot read: not a regular file but a FIFO (named pipe)",
            "1 unreadable image(s) skipped",
        ],
        setup=_fifo,
        check=_check_eval(1, "fifo.png"),
    ),  # fmt: skip
    "eval-image-is-a-symlink-loop": Case(
        _eval(data="{tmp}/data.json", images="{tmp}/imgs"),
        0,
        ["loop.png: cannot read: Too many levels of symbolic links (a symlink loop)"],
        setup=_symlink_loop,
        check=_check_eval(1, "loop.png"),
    ),  # fmt: skip
    "predict-15000px-tiff-real-size": Case(
        _predict("{tmp}/big.tif", "{images}/ok.png"),
        0,
        ["big.tif: image is 15000x15000 = 225000000 pixels"],
        setup=_huge_header_images,
        check=_check_predicted("ok.png", failed=("big.tif",)),
    ),  # fmt: skip
    "predict-15000px-gif-real-size": Case(
        _predict("{tmp}/big.gif"),
        1,
        ["big.gif: image is 15000x15000 = 225000000 pixels"],
        setup=_huge_header_images,
    ),  # fmt: skip
    "eval-images-is-a-file": Case(_eval(images="{root}/plain-file"), 2, ["plain-file: is not a folder"]),
    "predict-onnx-bad-metadata": Case(
        _predict("{images}/ok.png", weights="{root}/bad-meta.onnx"),
        2,
        ["bad-meta.onnx: invalid atssdet metadata", "JSONDecodeError"],
    ),  # fmt: skip
    "predict-cuda-index-out-of-range": Case(
        [*_predict("{images}/ok.png"), "--device", "cuda:3"],
        2,
        ["--device 'cuda:3': this machine has 1 CUDA device(s) (cuda:0..cuda:0)"],
        setup=_one_cuda_device,
    ),  # fmt: skip
}

# ------------------------------------------------------------------ silently wrong results (bad values)

SILENT: dict[str, Case] = {
    "predict-max-detections-negative": Case(
        [*_predict("{images}/ok.png"), "--max-detections", "-5"], 2, ["max_detections must be >= 1, got -5"]
    ),
    "predict-score-threshold-2": Case(
        [*_predict("{images}/ok.png"), "--score-threshold", "2"], 2, ["score_threshold", "in [0, 1], got 2.0"]
    ),
    "predict-nms-threshold-nan": Case(
        [*_predict("{images}/ok.png"), "--nms-threshold", "nan"], 2, ["nms_threshold", "in [0, 1], got nan"]
    ),
    "predict-draw-threshold-5": Case(
        [*_predict("{images}/ok.png"), "--draw-threshold", "5"], 2, ["draw_threshold", "in [0, 1], got 5.0"]
    ),
    "predict-max-size-20000": Case(
        [*_predict("{images}/ok.png"), "--max-size", "20000"],
        2,
        ["max_size=20000: expected an integer in [1, 8192]"],
    ),
    "predict-checkpoint-metadata-100000px": Case(
        _predict("{images}/ok.png", weights="{root}/huge-size.safetensors"),
        2,
        [
            "huge-size.safetensors: invalid atssdet_config metadata",
            "test_image_short_size=100000: expected an integer in [1, 8192]",
        ],
    ),  # fmt: skip
    "eval-set-short-size-100000": Case(
        [*_eval(), "--set", "test_image_short_size=100000"],
        2,
        ["test_image_short_size=100000: expected an integer in [1, 8192]"],
    ),
    "eval-set-max-detections-negative": Case(
        [*_eval(), "--set", "test_max_boxes_per_image=-5"],
        2,
        ["test_max_boxes_per_image=-5: expected an integer in [1, 100000]"],
    ),
    "eval-workers-negative": Case([*_eval(), "--workers", "-1"], 2, ["num_workers must be >= 0, got -1"]),
    "train-negative-learning-rate": Case(
        [*_train(), "--set", "basic_lr=-0.01"], 2, ["basic_lr must be a finite number > 0, got -0.01"]
    ),
    "train-nan-learning-rate": Case(
        [*_train(), "--set", "basic_lr=NaN"], 2, ["basic_lr must be a finite number > 0, got nan"]
    ),
    "train-short-size-0": Case(
        [*_train(), "--set", "train_image_short_size=[0,800]"],
        2,
        ["train_image_short_size=(0, 800): expected integers in [1, 8192]"],
    ),  # fmt: skip
    "train-max-iters-0": Case([*_train(), "--max-iters", "0"], 2, ["max_iters must be >= 1, got 0"]),
}

# ------------------------------------------------------------------ one image takes a batch down

_CV2_OOM = "OpenCV(5.0.0) /io/opencv/modules/core/src/alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate"
_CV2_ASSERT = (
    "OpenCV(5.0.0) /io/opencv/modules/imgproc/src/resize.cpp:1: error: (-215:Assertion failed) in 'resize'"
)
_MIXED = (
    "{images}/ok.png",
    "{images}/thin.png",
    "{images}/thin3.png",
    "{images}/corrupt.png",
    "{images}/ok2.png",
)
ISOLATION: dict[str, Case] = {
    "predict-1x10000-png": Case(
        _predict("{images}/thin.png", "{images}/ok.png"),
        0,
        ["thin.png", "10000x1", "2 image(s) done, 0 failed"],
        check=_check_predicted("thin.png", "ok.png"),
    ),  # fmt: skip
    "predict-3x4000-png-in-a-batch": Case(
        [*_predict("{images}/thin3.png", "{images}/ok.png"), "--batch-size", "2"],
        0,
        ["2 image(s) done, 0 failed"],
        check=_check_predicted("thin3.png", "ok.png"),
    ),  # fmt: skip
    "predict-mixed-batch": Case(  # acceptance 4
        [*_predict(*_MIXED), "--batch-size", "2"],
        0,
        ["4 image(s) done, 1 failed", "skipped {images}/corrupt.png: truncated PNG"],
        check=_check_predicted("ok.png", "thin.png", "thin3.png", "ok2.png", failed=("corrupt.png",)),
    ),  # fmt: skip
    "predict-out-of-memory-batch-retried-per-image": Case(
        [*_predict("{images}/ok.png", "{images}/ok.png", "{tmp}/copy.png"), "--batch-size", "2"],
        0,
        ["2 image(s) done, 0 failed"],
        check=_check_predicted("ok.png", "copy.png"),
        setup=_batch_of_two_runs_out_of_memory,
    ),  # fmt: skip
    "predict-out-of-memory-on-one-image": Case(
        [*_predict("{images}/ok.png", "{images}/thin3.png", "{images}/ok2.png"), "--batch-size", "2"],
        0,
        ["2 image(s) done, 1 failed", "thin3.png: out of memory running the model on its 160x1 input"],
        setup=_memory_error_when(_has_orig(3, 4000)),
        check=_check_predicted("ok.png", "ok2.png", failed=("thin3.png",)),
    ),  # fmt: skip
    "predict-decode-out-of-memory": Case(
        _predict(*_MIXED),
        0,
        ["thin3.png: not enough memory to decode the 4000x3 PNG image", "3 image(s) done, 2 failed"],
        setup=_decode_runs_out_of_memory,
        check=_check_predicted("ok.png", "thin.png", "ok2.png", failed=("thin3.png", "corrupt.png")),
    ),  # fmt: skip
    "eval-mixed-batch": Case(  # acceptance 4
        [*_eval(data="{root}/mixed.json"), "--batch-size", "2"],
        0,
        ["4 images", "1 unreadable image(s) skipped", "corrupt.png: truncated PNG"],
        check=_check_eval(4, "corrupt.png"),
    ),  # fmt: skip
    "eval-out-of-memory-on-one-image": Case(
        [*_eval(data="{root}/mixed.json"), "--batch-size", "2"],
        0,
        ["thin3.png: out of memory running the model", "3 images"],
        setup=_memory_error_when(_has_orig(3, 4000)),
        check=_check_eval(3, "corrupt.png", "thin3.png"),
    ),  # fmt: skip
    "eval-resize-fails-on-one-image": Case(
        _eval(data="{root}/mixed.json"),
        0,
        ["thin.png: cannot resize the 10000x1 image", "Insufficient memory"],
        setup=_cv2_error_on((1, 10000), transforms, "resize_shortest_edge", _CV2_OOM),
        check=_check_eval(3, "corrupt.png", "thin.png"),
    ),  # fmt: skip
    "train-mixed-batch": Case(  # acceptance 4
        [*_train(data="{root}/mixed.json"), "--data-check", "quick", "--max-iters", "4"],
        0,
        ["skipping unreadable image", "corrupt.png: truncated PNG", "final weights"],
        setup=_record_trained,
        check=_check_trained("corrupt.png"),
    ),  # fmt: skip
    "train-transform-fails-on-one-image": Case(
        [*_train(data="{root}/mixed.json"), "--data-check", "quick", "--max-iters", "4"],
        0,
        ["thin3.png: cannot transform the 4000x3 image", "corrupt.png", "final weights"],
        setup=_transform_fails_on_thin3,
        check=_check_trained("corrupt.png", "thin3.png"),
    ),  # fmt: skip
}

KINDS = {"traceback": TRACEBACKS, "misleading": MISLEADING, "silent": SILENT, "isolation": ISOLATION}
ALL_CASES = {f"{kind}:{name}": case for kind, cases in KINDS.items() for name, case in cases.items()}


def test_case_table_has_enough_cases_of_each_kind():
    assert len(TRACEBACKS) >= 12 and len(MISLEADING) >= 6 and len(SILENT) >= 6 and len(ISOLATION) >= 6


def _fill(text: str, places: dict[str, str]) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.parametrize("case_id", sorted(ALL_CASES))
def test_reliability_case(case_id, assets, tmp_path, monkeypatch, capsys):
    case = ALL_CASES[case_id]
    if case.needs_reference and not REFERENCE_DIR.is_dir():
        pytest.skip(f"MegEngine reference data not found at {REFERENCE_DIR}")
    work = tmp_path / "case"
    work.mkdir()
    ctx = Ctx(work, monkeypatch, assets["images"])
    if case.setup is not None:
        case.setup(ctx)
    places = {"root": str(assets["root"]), "images": str(assets["images"]), "tmp": str(work)}
    argv = [_fill(a, places) for a in case.argv]
    before = {"assets": snapshot_files(assets["root"]), "case": snapshot_files(work)}
    try:
        status = main(argv)
    finally:
        for stop in ctx.stops:
            stop.set()
    out = capsys.readouterr()
    text = out.err + out.out
    assert status == case.status, text[-3000:]
    for fragment in case.expect:
        assert _fill(fragment, places) in text, f"{_fill(fragment, places)!r} not in:\n{text[-3000:]}"
    assert "Traceback" not in text
    after = {"assets": snapshot_files(assets["root"]), "case": snapshot_files(work)}
    for where in ("assets", "case"):
        changed = [p for p, digest in before[where].items() if after[where].get(p) != digest]
        assert not changed, f"files present before the command were changed or removed: {changed}"
    if case.check is not None:
        case.check(ctx, text)


# ------------------------------------------------------------------ the same rules through the Python API


def _tiny_detector(**kwargs: Any) -> Any:
    from atssdet.detector import Detector

    torch.manual_seed(0)
    return Detector(build_model(TINY_CFG), **{"device": "cpu", **kwargs})


API_CASES: dict[str, tuple[Callable[[], Any], str]] = {
    "detector-short-size-0": (
        lambda: _tiny_detector(short_size=0),
        "short_size=0: expected an integer in [1, 8192]",
    ),
    "detector-max-size-float": (
        lambda: _tiny_detector(max_size=800.5),
        "max_size=800.5: expected an integer in [1, 8192]",
    ),
    "detector-device-meta": (lambda: _tiny_detector(device="meta"), "--device 'meta'"),
    "detector-batch-size-0": (
        lambda: _tiny_detector().predict([np.zeros((8, 8, 3), np.uint8)], batch_size=0),
        "batch_size must be >= 1, got 0",
    ),
    "options-max-detections-negative": (
        lambda: InferenceOptions(max_detections=-5),
        "max_detections must be >= 1",
    ),
    "config-learning-rate-inf": (
        lambda: ATSSConfig(basic_lr=float("inf")),
        "basic_lr must be a finite number > 0",
    ),
    "config-from-metadata-100000px": (
        lambda: ATSSConfig.from_json(json.dumps({"test_image_short_size": 100000})),
        "test_image_short_size=100000: expected an integer in [1, 8192]",
    ),
    "evaluate-short-size-0": (
        lambda: _evaluate_with(short_size=0),
        "short_size=0: expected an integer in [1, 8192]",
    ),
}


def _evaluate_with(**kwargs: Any) -> Any:
    from atssdet.evaluation import evaluate

    return evaluate(lambda images: [], "unused.json", ".", **kwargs)


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_api_refuses_bad_values_like_the_cli(case):
    from atssdet.errors import OptionError

    run, message = API_CASES[case]
    with pytest.raises(OptionError) as info:
        run()
    assert message in str(info.value)


def test_detector_yields_results_for_every_valid_array_and_an_error_for_the_bad_one():
    det = _tiny_detector()
    images = [RNG.integers(0, 255, (1, 10000, 3), dtype=np.uint8), np.zeros((0, 5, 3), np.uint8),
              RNG.integers(0, 255, (40, 30, 3), dtype=np.uint8)]  # fmt: skip
    results = det.predict(images, batch_size=2)
    assert [r.ok for r in results] == [True, False, True]
    assert results[0].image_hw == (1, 10000) and len(results[0]) > 0
    assert "<array 1>" in str(results[1].error) and "shape (0, 5, 3)" in str(results[1].error)


# ------------------------------------------------------------------ the boundary itself


def _models_raises(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    import atssdet.cli.models as models

    monkeypatch.setattr(models, "run", lambda args: _raise(exc))


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_prints_the_traceback_of_a_user_error(where, monkeypatch, capsys):
    _models_raises(monkeypatch, ValueError("x.json: not valid"))
    argv = ["--debug", "models"] if where == "before" else ["models", "--debug"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("atssdet models: error: x.json: not valid")
    assert main(["models"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    from atssdet.errors import REPORT_URL

    _models_raises(monkeypatch, TypeError("unsupported operand"))
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "TypeError: unsupported operand" in err
    assert "atssdet models: internal error (TypeError): this is a bug in atssdet" in err and REPORT_URL in err


def test_interrupt_exits_130_without_a_traceback(monkeypatch, capsys):
    _models_raises(monkeypatch, KeyboardInterrupt())
    assert main(["models"]) == 130
    assert capsys.readouterr().err == "atssdet models: interrupted\n"


def _cv2_error() -> BaseException:
    try:
        cv2.resize(np.zeros((2, 2, 3), np.uint8), (0, 0))
    except cv2.error as exc:
        return exc
    raise AssertionError("cv2.resize accepted a 0x0 size")


# exception -> fragments of describe_user_error(exc), or None for a bug
DESCRIBED: dict[str, tuple[Callable[[], BaseException], list[str] | None]] = {
    "permission-denied": (lambda: PermissionError(errno.EACCES, "Permission denied", "/data/x.png"), ["/data/x.png: permission denied"]),
    "rename-onto-a-folder": (
        lambda: IsADirectoryError(errno.EISDIR, "Is a directory", "/o/.r.json.abc.tmp", None, "/o/r.json"),
        ["/o/r.json: is a folder, not a file"],
    ),
    "symlink-loop": (lambda: OSError(errno.ELOOP, "Too many levels of symbolic links", "a.png"), ["a.png: too many levels", "a symlink loop"]),
    "no-space": (lambda: OSError(errno.ENOSPC, "No space left on device", "out/x"), ["out/x: no space left on the device"]),
    "message-only-os-error": (lambda: FileNotFoundError("runs/x: image folder not found"), ["runs/x: image folder not found"]),
    "cv2-error": (_cv2_error, ["OpenCV cannot process the input", "(-215:Assertion failed)"]),
    "torch-cpu-allocation": (
        lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB"),
        ["out of memory", "--batch-size"],
    ),
    "recursion": (lambda: RecursionError("maximum recursion depth exceeded"), ["nested too deeply"]),
    "typed-error": (lambda: ImageReadError("v.png: truncated PNG"), ["v.png: truncated PNG"]),
    "bug-type-error": (lambda: TypeError("'NoneType' object is not subscriptable"), None),
    "bug-key-error": (lambda: KeyError("boxes"), None),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DESCRIBED))
def test_describe_user_error(case):
    from atssdet.errors import describe_user_error

    make, fragments = DESCRIBED[case]
    message = describe_user_error(make())
    if fragments is None:
        assert message is None
        return
    assert message is not None
    for fragment in fragments:
        assert fragment in message, message
    assert "/io/opencv" not in message  # no OpenCV source paths


def test_torch_load_problem_drops_the_advice_to_load_unsafely(tmp_path):
    from atssdet.errors import torch_load_problem

    torch.save({"f": os.system}, tmp_path / "code.pt")
    (tmp_path / "zip.pt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    for name, expected in (("code.pt", "posix.system"), ("zip.pt", "RuntimeError")):
        with pytest.raises(Exception) as info:
            torch.load(tmp_path / name, weights_only=True)
        problem = torch_load_problem(info.value)
        assert expected in problem and "weights_only" not in problem and "False" not in problem, problem
