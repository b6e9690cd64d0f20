"""Batched inference on images and files: :class:`Detector` and :func:`predict_files` (the CLI's job).

Typical use::

    det = Detector.from_pretrained("atss_res50_coco_3x_800size")      # or Detector.from_checkpoint(path)
    for result in det.predict(["cat.jpg", cv2.imread("dog.png")], batch_size=4):
        print(result.names, result.scores)
        result.save("cat_drawn.jpg")

Pre-processing is MegEngine's evaluation pipeline (``resize_shortest_edge`` to
``cfg.test_image_short_size``/``test_image_max_size`` with ``cv2.resize`` on uint8, zero padding),
so the results equal :meth:`atssdet.compat.DetEvaluator.predict` image by image.

Batching never changes a result: a convolution near an image's border sees whatever padding the
batch adds (and GroupNorm in the head averages over it), so images are only batched with others of
the same padded (/32) input size; each batch is exactly what each image would see alone.
Results are returned in input order.

Unreadable inputs do not stop a batch job: each yields a :class:`~atssdet.postprocess.Detections`
with ``error`` set (naming the file) and no boxes, and a warning is logged.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from atssdet.batching import group_by_padded_size, padded_size
from atssdet.config import COCO_CLASSES, ATSSConfig, with_overrides
from atssdet.data.image_io import ImageReadError, read_image
from atssdet.data.transforms import images_to_batch, resize_shortest_edge
from atssdet.export import OnnxDetector
from atssdet.modeling.atss import ATSS
from atssdet.postprocess import Detections, dense_scores_and_boxes, select_detections

logger = logging.getLogger(__name__)

ImageInput: TypeAlias = "str | os.PathLike[str] | np.ndarray"  # a file path or a BGR uint8 [H, W, 3] array


def predict_files(
    inputs: Sequence[str],
    *,
    detector: Detector,
    out_dir: str | os.PathLike[str],
    batch_size: int | None = None,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    classes: Sequence[int | str] | None = None,
    flip_tta: bool = False,
    draw: bool = True,
    draw_threshold: float | None = None,
    coco: bool = False,
    coco_annotations: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> PredictReport:
    """Detect objects in files/folders/globs and write drawn images plus one JSON into ``out_dir``.

    ``inputs`` are files, folders (their non-hidden files, sorted, not recursive) or glob patterns.
    Writes, atomically: ``<out_dir>/<image name>`` with every detection scoring ``>= draw_threshold``
    drawn (default ``cfg.test_vis_threshold``), and ``predictions.json`` (``{"model", "images": [...],
    "failed": [...]}``), or with ``coco=True`` ``predictions_coco.json`` (a COCO results list) plus
    ``images_coco.json`` (a COCO dataset skeleton: images + categories, for ``COCO(...).loadRes``).
    Image ids are 1-based positions in the expanded input list (a failed file leaves its number
    unused, so ids do not depend on which files fail), unless ``coco_annotations`` (a COCO
    annotation file) is given, which supplies the ids by file name. Unreadable or missing inputs are
    reported in ``PredictReport.failed`` and skipped.
    """
    from tqdm import tqdm

    from atssdet.fileio import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, failed = expand_inputs(inputs)
    cfg = detector.cfg
    if draw_threshold is None:
        draw_threshold = cfg.test_vis_threshold
    ids_by_name: dict[str, int] | None = None
    if coco_annotations is not None:
        ids_by_name = _coco_image_ids(Path(coco_annotations))
        keep = []
        for f in files:
            if Path(f).name in ids_by_name:
                keep.append(f)
            else:
                failed.append((f, f"{f}: not listed in {coco_annotations} (no image id)"))
        files = keep

    report = PredictReport(out_dir=out, failed=failed)
    used_names: set[str] = set()
    records: list[dict[str, Any]] = []
    coco_results: list[dict[str, Any]] = []
    coco_images: list[dict[str, Any]] = []
    start = time.perf_counter()
    results = detector.iter_predict(
        files,
        batch_size=batch_size,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
        classes=classes,
        flip_tta=flip_tta,
        keep_images=draw,
    )
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for index, (path, result) in enumerate(zip(files, results, strict=True)):
            bar.update(1)
            if not result.ok:
                report.failed.append((path, result.error or "unreadable"))
                continue
            image_id = ids_by_name[Path(path).name] if ids_by_name is not None else index + 1
            drawn_path = None
            if draw:
                drawn_path = out / _unique_name(Path(path), used_names)
                result.save(drawn_path, score_threshold=draw_threshold)
            result.image = None  # free the pixels; only the detections are kept
            h, w = result.image_hw or (0, 0)
            record = {"image_id": image_id, "file": str(path), **result.to_dict()}
            record["drawn"] = str(drawn_path) if drawn_path is not None else None
            del record["source"]
            records.append(record)
            report.rows.append(
                PredictRow(
                    path=str(path),
                    height=h,
                    width=w,
                    num_detections=len(result),
                    num_drawn=int((result.scores >= draw_threshold).sum()),
                    top=_top_names(result, draw_threshold),
                )
            )
            if coco:
                coco_results += result.to_coco(image_id)
                coco_images.append({"id": image_id, "file_name": Path(path).name, "height": h, "width": w})
    report.seconds = time.perf_counter() - start
    failed_json = [{"file": f, "error": e} for f, e in report.failed]
    if coco:
        from atssdet.postprocess import COCO_CATEGORY_IDS

        ids = COCO_CATEGORY_IDS if cfg.class_names == COCO_CLASSES else range(1, cfg.num_classes + 1)
        categories = [{"id": int(i), "name": n} for i, n in zip(ids, cfg.class_names, strict=True)]
        report.json_path = atomic_write_text(out / "predictions_coco.json", json.dumps(coco_results) + "\n")
        atomic_write_text(
            out / "images_coco.json",
            json.dumps({"images": coco_images, "annotations": [], "categories": categories}) + "\n",
        )
    else:
        doc = {"model": detector.describe(), "images": records, "failed": failed_json}
        report.json_path = atomic_write_text(out / "predictions.json", json.dumps(doc, indent=1) + "\n")
    return report


# Inputs routed to :func:`predict_video` by ``atssdet predict`` (any container OpenCV's FFmpeg reads).
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


@dataclass
class VideoReport:
    """What :func:`predict_video` wrote: the drawn video, the per-frame JSON lines, frame count, time."""

    source: str
    video_path: Path | None
    jsonl_path: Path
    frames: int
    fps: float
    seconds: float


def predict_video(
    path: str | os.PathLike[str],
    *,
    detector: Detector,
    out_dir: str | os.PathLike[str],
    batch_size: int | None = None,
    score_threshold: float | None = None,
    nms_threshold: float | None = None,
    max_detections: int | None = None,
    class_agnostic: bool = False,
    classes: Sequence[int | str] | None = None,
    flip_tta: bool = False,
    draw: bool = True,
    draw_threshold: float | None = None,
    progress: bool = True,
) -> VideoReport:
    """Detect objects in every frame of a video and write the results into ``out_dir``, atomically.

    Frames are decoded one by one with OpenCV (any format its FFmpeg build reads) and go through
    :meth:`Detector.iter_predict` like any BGR array. Writes ``<stem>.detections.jsonl``, one line per
    frame ``{"frame", "time_s", "height", "width", "detections": [...]}``, and, with ``draw``,
    ``<stem>.mp4`` (MPEG-4 Part 2, the source's frame rate and size) with every detection scoring
    ``>= draw_threshold`` drawn. Both files appear only when the whole video is done; a video that
    cannot be opened or has no decodable frame raises ValueError naming it.
    """
    from tqdm import tqdm

    from atssdet.fileio import atomic_path

    source = Path(path)
    capture = cv2.VideoCapture(str(source))
    if not source.is_file() or not capture.isOpened():
        capture.release()
        raise ValueError(f"{source}: cannot open as a video (missing, unsupported format or corrupt)")
    fps = float(capture.get(cv2.CAP_PROP_FPS))
    fps = fps if math.isfinite(fps) and fps > 0 else 25.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    if draw_threshold is None:
        draw_threshold = detector.cfg.test_vis_threshold

    def frames() -> Iterator[np.ndarray]:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield frame

    out = Path(out_dir)
    video_out = out / f"{source.stem}.mp4"
    if video_out.resolve() == source.resolve():
        video_out = out / f"{source.stem}.detections.mp4"
    jsonl_out = out / f"{source.stem}.detections.jsonl"
    start = time.perf_counter()
    count = 0
    results = detector.iter_predict(
        frames(),
        batch_size=batch_size,
        score_threshold=score_threshold,
        nms_threshold=nms_threshold,
        max_detections=max_detections,
        class_agnostic=class_agnostic,
        classes=classes,
        flip_tta=flip_tta,
    )
    writer: cv2.VideoWriter | None = None
    try:
        with contextlib.ExitStack() as stack:
            tmp_jsonl = stack.enter_context(atomic_path(jsonl_out, suffix=".jsonl"))
            tmp_video = stack.enter_context(atomic_path(video_out, suffix=".mp4")) if draw else None
            lines = stack.enter_context(open(tmp_jsonl, "w", encoding="utf-8"))
            bar = stack.enter_context(tqdm(total=total, unit="frame", desc=source.name, disable=not progress))
            for result in results:
                if tmp_video is not None:
                    drawn = result.plot(score_threshold=draw_threshold)
                    if writer is None:
                        h, w = drawn.shape[:2]
                        writer = cv2.VideoWriter(str(tmp_video), cv2.VideoWriter.fourcc(*"mp4v"), fps, (w, h))
                        if not writer.isOpened():
                            raise ValueError(f"{video_out}: OpenCV cannot write MPEG-4 video here")
                    writer.write(drawn)
                record = result.to_dict()
                del record["source"], record["error"]
                lines.write(json.dumps({"frame": count, "time_s": round(count / fps, 6), **record}) + "\n")
                result.image = None
                count += 1
                bar.update(1)
            if writer is not None:
                writer.release()  # before the temp file is renamed
            if count == 0:
                raise ValueError(f"{source}: no decodable frame")
    finally:
        if writer is not None:
            writer.release()
        capture.release()
    return VideoReport(
        source=str(source),
        video_path=video_out if draw else None,
        jsonl_path=jsonl_out,
        frames=count,
        fps=fps,
        seconds=time.perf_counter() - start,
    )


@dataclass
class PredictRow:
    path: str
    height: int
    width: int
    num_detections: int
    num_drawn: int
    top: str


@dataclass
class PredictReport:
    """What :func:`predict_files` did: one row per image done, ``failed`` = ``(input, reason)``."""

    out_dir: Path
    rows: list[PredictRow] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    json_path: Path | None = None
    seconds: float = 0.0

    @property
    def num_ok(self) -> int:
        return len(self.rows)

    def table(self, max_rows: int = 50) -> str:
        """A plain-text summary table (first ``max_rows`` images, then totals and failures)."""
        header = ("image", "size", "dets", "drawn", "top classes (drawn)")
        body = [
            (Path(r.path).name, f"{r.width}x{r.height}", str(r.num_detections), str(r.num_drawn), r.top)
            for r in self.rows[:max_rows]
        ]
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *body]
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(self.rows) > max_rows:
            lines.append(f"... {len(self.rows) - max_rows} more image(s)")
        rate = self.num_ok / self.seconds if self.seconds > 0 else 0.0
        lines.append(
            f"{self.num_ok} image(s) done, {len(self.failed)} failed, "
            f"{sum(r.num_detections for r in self.rows)} detections, {self.seconds:.1f} s ({rate:.2f} img/s)"
        )
        if self.json_path is not None:
            lines.append(f"wrote {self.json_path} and drawings to {self.out_dir}")
        return "\n".join(lines)


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Files from paths, folders (non-hidden files, sorted) and globs; ``(files, [(input, reason)])``."""
    files: list[str] = []
    failed: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(path: str) -> None:
        if path not in seen:
            seen.add(path)
            files.append(path)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            if not entries:
                failed.append((item, f"{item}: folder has no files"))
            for entry in entries:
                add(str(entry))
        elif path.is_file():
            add(item)
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                failed.append((item, f"{item}: pattern matches no files"))
            for match in matches:
                add(match)
        else:
            failed.append((item, f"{item}: no such file or folder"))
    return files, failed


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else ``cuda`` when available, else ``cpu``."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def unflip_boxes(boxes_xyxy: Tensor, width: Tensor) -> Tensor:
    """Map boxes ``[..., 4]`` found on a horizontally flipped image back: ``x' = W - x`` (no -1), x1/x2 swapped.

    ``width`` broadcasts against ``boxes_xyxy[..., 0]`` (e.g. ``[N, 1]`` for ``[N, A, 4]``).
    """
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)


@dataclass(frozen=True)
class _Options:
    score_threshold: float
    nms_threshold: float
    max_detections: int
    class_agnostic: bool
    classes: Tensor | None  # [K] label ids to keep
    flip_tta: bool


@dataclass
class _Pending:
    index: int
    source: str
    image: np.ndarray | None  # original BGR uint8 [H, W, 3] (None when only its size is known)
    resized: np.ndarray  # BGR uint8 [h, w, 3]
    keep_image: bool
    orig_hw: tuple[int, int]


class Detector:
    """An ATSS model plus MegEngine's test-time pre/post-processing, for any number of images.

    ``Detector(model)`` moves ``model`` to ``device`` (default: ``cuda`` if available, else ``cpu``)
    and puts it in eval mode. ``short_size``/``max_size`` override the config's
    ``test_image_short_size``/``test_image_max_size`` (800/1333 for the zoo models).
    """

    def __init__(
        self,
        model: ATSS | OnnxDetector,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        self.model: ATSS | OnnxDetector
        if isinstance(model, nn.Module):
            self.device = select_device(device)
            self.model = model.to(self.device).eval()
        else:  # an exported ONNX file run by ONNX Runtime; batches are built on the CPU
            self.device = torch.device("cpu")
            self.model = model
        self.cfg: ATSSConfig = model.cfg
        self.short_size = int(short_size if short_size is not None else self.cfg.test_image_short_size)
        self.max_size = int(max_size if max_size is not None else self.cfg.test_image_max_size)
        self.weights: str | None = None  # where the weights came from, for reports

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        numerics: str | None = None,
    ) -> Detector:
        """Zoo model ``name`` with its official COCO weights (downloaded once, see :mod:`atssdet.download`).

        ``numerics="megengine"`` computes as MegEngine does (head GroupNorm rounded as its CPU kernel,
        NCHW, its FrozenBN formula; see ``ATSSConfig.numerics``); default: the config's (``"torch"``).
        """
        from atssdet.zoo import load

        overrides = None if numerics is None else {"numerics": numerics}
        net = load(name, pretrained=True, overrides=overrides)
        det = cls(net, device=device, short_size=short_size, max_size=max_size)
        det.weights = name
        return det

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        model: str | ATSSConfig | None = None,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        numerics: str | None = None,
    ) -> Detector:
        """Weights from ``path`` (.safetensors, MegEngine .pkl/.pkl.gz, .pt/.pth) or an exported ``.onnx``.

        ``model`` is a zoo name or an :class:`ATSSConfig`. It may be omitted for an atssdet
        ``.safetensors`` file, which carries its config in its metadata; other formats need it.
        An ``.onnx`` file from ``atssdet export`` carries its config too and runs in ONNX Runtime
        (``device`` "cpu" or "cuda"); results are the same :class:`Detections`. ``numerics``
        replaces the config's (``"megengine"``: see :meth:`from_pretrained`; not for ``.onnx``).
        """
        from atssdet.convert import CheckpointError, load_weights, read_checkpoint_config
        from atssdet.modeling.atss import build_model
        from atssdet.zoo import ZOO, get_entry

        if Path(path).suffix == ".onnx":
            from atssdet.export import OnnxDetector

            if numerics not in (None, "torch"):
                raise ValueError(f"{path}: numerics={numerics!r} needs the PyTorch model, not an ONNX file")
            if not Path(path).is_file():
                raise CheckpointError(f"{path}: no such file")
            det = cls(
                OnnxDetector(path, device=None if device is None else str(device)),
                short_size=short_size,
                max_size=max_size,
            )
            det.weights = str(path)
            return det
        if isinstance(model, ATSSConfig):
            cfg = model
        elif isinstance(model, str):
            cfg = get_entry(model).config
        else:
            if not Path(path).is_file():
                raise CheckpointError(f"{path}: no such file")
            found = read_checkpoint_config(path)
            if found is None:
                raise CheckpointError(
                    f"{path}: this checkpoint does not say which model it belongs to (only atssdet "
                    f".safetensors files carry a config); give the model: model=NAME in Python, "
                    f"--model NAME on the command line (one of: {', '.join(ZOO)})"
                )
            cfg = found
        if numerics is not None:
            cfg = with_overrides(cfg, {"numerics": numerics})
        net = build_model(cfg)
        load_weights(net, path)
        det = cls(net, device=device, short_size=short_size, max_size=max_size)
        det.weights = str(path)
        return det

    def default_batch_size(self) -> int:
        """1 on CPU (batching is slower there: 0.80 vs 0.63 img/s at batch 1 vs 4, ATSS-R50 800x1333 on
        2 cores, benchmarks/bench_predict.py), 4 on a GPU."""
        return 4 if self.device.type == "cuda" else 1

    def describe(self) -> dict[str, Any]:
        """Model facts for output files: backbone, weights, classes, test sizes, device."""
        return {
            "backbone": self.cfg.backbone,
            "weights": self.weights,
            "num_classes": self.cfg.num_classes,
            "short_size": self.short_size,
            "max_size": self.max_size,
            "device": str(self.device),
            "numerics": self.cfg.numerics,
        }

    def class_ids(self, classes: Sequence[int | str]) -> list[int]:
        """Label ids for a mix of ids and class names; unknown ones raise ValueError."""
        names = self.cfg.class_names
        ids: list[int] = []
        for c in classes:
            if isinstance(c, str) and not c.strip().lstrip("-").isdigit():
                if c not in names:
                    raise ValueError(f"unknown class name {c!r}; known: {', '.join(names)}")
                ids.append(names.index(c))
            else:
                i = int(c)
                if not 0 <= i < self.cfg.num_classes:
                    raise ValueError(f"class id {i} out of range 0..{self.cfg.num_classes - 1}")
                ids.append(i)
        return ids

    def predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        class_agnostic: bool = False,
        classes: Sequence[int | str] | None = None,
        flip_tta: bool = False,
    ) -> list[Detections]:
        """One :class:`Detections` per input, in input order (see :meth:`iter_predict`)."""
        return list(
            self.iter_predict(
                images,
                batch_size=batch_size,
                score_threshold=score_threshold,
                nms_threshold=nms_threshold,
                max_detections=max_detections,
                class_agnostic=class_agnostic,
                classes=classes,
                flip_tta=flip_tta,
            )
        )

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        class_agnostic: bool = False,
        classes: Sequence[int | str] | None = None,
        flip_tta: bool = False,
        keep_images: bool = False,
    ) -> Iterator[Detections]:
        """Yield one :class:`Detections` per input, in input order, reading files lazily.

        ``images``: file paths and/or BGR uint8 ``[H, W, 3]`` arrays (grey ``[H, W]`` accepted).
        Thresholds default to the config (``test_cls_threshold`` 0.05, ``test_nms`` 0.6,
        ``test_max_boxes_per_image`` 100). ``class_agnostic`` runs one NMS over all classes;
        ``classes`` (ids or names) keeps only those classes. ``flip_tta`` adds a horizontally
        flipped pass whose boxes are mapped back (``x' = W - x``) and pooled with the plain pass's
        candidates *before* the NMS, so each object keeps the single best box of either view.
        Array inputs are kept on the result (``result.image``) for :meth:`Detections.plot`; file
        inputs are too when ``keep_images``. Boxes etc. are CPU tensors. ``batch_size`` (images per
        forward pass) defaults to :meth:`default_batch_size`.
        """
        if batch_size is None:
            batch_size = self.default_batch_size()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        options = self._options(
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            class_agnostic=class_agnostic,
            classes=classes,
            flip_tta=flip_tta,
        )
        # Images wait in per-size buckets until one is full; results are released in input order.
        max_pending = 4 * batch_size
        buckets: dict[tuple[int, int], list[_Pending]] = {}
        done: dict[int, Detections] = {}
        next_out = 0
        for index, item in enumerate(images):
            pending = self._prepare(index, item, keep_images)
            if isinstance(pending, Detections):
                done[index] = pending
            else:
                key = padded_size(*pending.resized.shape[:2])
                bucket = buckets.setdefault(key, [])
                bucket.append(pending)
                if len(bucket) >= batch_size:
                    done.update(self._run(buckets.pop(key), options))
            # An image alone in its size bucket holds back the results after it (and, with
            # keep_images, their pixels): past the cap, run the bucket holding the oldest image.
            if buckets and sum(len(b) for b in buckets.values()) + len(done) > max_pending:
                oldest = min(buckets, key=lambda k: buckets[k][0].index)
                done.update(self._run(buckets.pop(oldest), options))
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        for key in sorted(buckets, key=lambda k: buckets[k][0].index):
            done.update(self._run(buckets[key], options))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    def _options(
        self,
        *,
        score_threshold: float | None,
        nms_threshold: float | None,
        max_detections: int | None,
        class_agnostic: bool,
        classes: Sequence[int | str] | None,
        flip_tta: bool,
    ) -> _Options:
        return _Options(
            score_threshold=self.cfg.test_cls_threshold if score_threshold is None else score_threshold,
            nms_threshold=self.cfg.test_nms if nms_threshold is None else nms_threshold,
            max_detections=self.cfg.test_max_boxes_per_image if max_detections is None else max_detections,
            class_agnostic=class_agnostic,
            classes=None if classes is None else torch.tensor(self.class_ids(classes), dtype=torch.long),
            flip_tta=flip_tta,
        )

    def detect_resized(
        self,
        resized: Sequence[np.ndarray],
        orig_hw: Sequence[tuple[int, int]],
        *,
        score_threshold: float | None = None,
        nms_threshold: float | None = None,
        max_detections: int | None = None,
        class_agnostic: bool = False,
        classes: Sequence[int | str] | None = None,
        flip_tta: bool = False,
    ) -> list[Detections]:
        """Detections for images already resized by :func:`~atssdet.data.transforms.resize_shortest_edge`.

        ``resized``: BGR uint8 ``[h_i, w_i, 3]``; ``orig_hw``: the original ``(H_i, W_i)`` that boxes
        are mapped back to. Images run in batches of equal padded size (each as if alone); for
        pipelines that resize in loader threads (evaluation). Options as in :meth:`iter_predict`.
        """
        options = self._options(
            score_threshold=score_threshold,
            nms_threshold=nms_threshold,
            max_detections=max_detections,
            class_agnostic=class_agnostic,
            classes=classes,
            flip_tta=flip_tta,
        )
        items = [
            _Pending(i, f"<image {i}>", None, r, False, (int(hw[0]), int(hw[1])))
            for i, (r, hw) in enumerate(zip(resized, orig_hw, strict=True))
        ]
        done: dict[int, Detections] = {}
        for group in group_by_padded_size([it.resized.shape[:2] for it in items]):
            done.update(self._run([items[i] for i in group], options))
        return [done[i] for i in range(len(items))]

    def _prepare(self, index: int, item: ImageInput, keep_image: bool) -> _Pending | Detections:
        """Read/validate one input and resize it; an unreadable one becomes an error result."""
        if isinstance(item, np.ndarray):
            source = f"<array {index}>"
            try:
                image = _check_array(item, source)
            except ImageReadError as exc:
                return self._error_result(source, str(exc))
            keep_image = True
        else:
            if not isinstance(item, (str, os.PathLike)):
                raise TypeError(
                    f"input {index}: expected a file path or a BGR uint8 numpy array, got {type(item).__name__}"
                )
            source = os.fspath(item)
            try:
                image = read_image(source)
            except ImageReadError as exc:
                return self._error_result(source, str(exc))
        resized = resize_shortest_edge(image, self.short_size, self.max_size)
        return _Pending(index, source, image, resized, keep_image, (int(image.shape[0]), int(image.shape[1])))

    def _error_result(self, source: str, message: str) -> Detections:
        logger.warning("skipping %s", message)
        return Detections(
            torch.zeros((0, 4)),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.long),
            class_names=self.cfg.class_names,
            source=source,
            error=message,
        )

    def _dense(self, batch: Tensor, image_hw: Tensor, orig_hw: Tensor) -> tuple[Tensor, Tensor]:
        """Dense scores ``[N, A, C]`` and boxes ``[N, A, 4]`` (original pixels) from PyTorch or ONNX Runtime."""
        if isinstance(self.model, OnnxDetector):
            return self.model.dense(batch, image_hw, orig_hw)
        return dense_scores_and_boxes(self.model(batch), image_hw, orig_hw)

    def _run(self, items: list[_Pending], options: _Options) -> dict[int, Detections]:
        """Detect on images that share a padded size: one forward pass (two with flip TTA)."""
        image_hw = torch.tensor([it.resized.shape[:2] for it in items], dtype=torch.float32)
        orig_hw = torch.tensor([it.orig_hw for it in items], dtype=torch.float32)
        with torch.inference_mode():
            batch = images_to_batch([it.resized for it in items], device=self.device)
            if isinstance(self.model, OnnxDetector) and self.model.with_nms:
                if options.flip_tta:
                    raise ValueError(
                        f"{self.weights}: flip TTA needs an ONNX file exported without --with-nms"
                    )
                dets = self.model.predict_batch(
                    batch,
                    image_hw,
                    orig_hw,
                    score_threshold=options.score_threshold,
                    nms_threshold=options.nms_threshold,
                    max_detections=options.max_detections,
                    class_agnostic=options.class_agnostic,
                    classes=options.classes,
                )
            else:
                scores, boxes = self._dense(batch, image_hw, orig_hw)  # [N,A,C], [N,A,4]
                if options.flip_tta:
                    flipped = images_to_batch([cv2.flip(it.resized, 1) for it in items], device=self.device)
                    scores_f, boxes_f = self._dense(flipped, image_hw, orig_hw)
                    boxes_f = unflip_boxes(boxes_f, orig_hw[:, 1, None].to(boxes_f.device))
                    scores = torch.cat((scores, scores_f), dim=1)
                    boxes = torch.cat((boxes, boxes_f), dim=1)
                dets = select_detections(
                    scores,
                    boxes,
                    score_threshold=options.score_threshold,
                    nms_threshold=options.nms_threshold,
                    max_detections=options.max_detections,
                    class_agnostic=options.class_agnostic,
                    classes=options.classes,
                )
        out: dict[int, Detections] = {}
        for it, d in zip(items, dets, strict=True):
            out[it.index] = Detections(
                d.boxes.cpu(),
                d.scores.cpu(),
                d.labels.cpu(),
                class_names=self.cfg.class_names,
                image_hw=it.orig_hw,
                source=it.source,
                image=it.image if it.keep_image else None,
            )
        return out


def _check_array(image: np.ndarray, source: str) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ImageReadError(f"{source}: expected a uint8 BGR image, got dtype {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"{source}: expected a BGR image [H, W, 3], got shape {image.shape}")
    return image


def _coco_image_ids(path: Path) -> dict[str, int]:
    try:
        data = json.loads(path.read_text())
        return {Path(im["file_name"]).name: int(im["id"]) for im in data["images"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a COCO annotation file with images[].file_name/id: {exc}") from exc


def _unique_name(path: Path, used: set[str]) -> str:
    suffix = (
        path.suffix.lower() if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp") else ".jpg"
    )
    name = path.stem + suffix
    n = 1
    while name in used:
        n += 1
        name = f"{path.stem}_{n}{suffix}"
    used.add(name)
    return name


def _top_names(result: Detections, threshold: float, limit: int = 4) -> str:
    keep = result.scores >= threshold
    names = [n for n, k in zip(result.names, keep.tolist(), strict=True) if k]
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{n} x{c}" if c > 1 else n for n, c in ranked[:limit])
    return text + (", ..." if len(ranked) > limit else "")
