"""``atssdet predict`` on image files: :func:`predict_files` (videos: :mod:`atssdet.video`).

Inputs are files, folders and globs (:func:`expand_inputs`); detection is
:meth:`atssdet.detector.Detector.iter_predict` under one :class:`~atssdet.options.InferenceOptions`;
drawings go through :mod:`atssdet.visualize` and COCO results through
:func:`atssdet.evaluation.coco.detections_to_coco` (the one COCO conversion, shared with ``eval``).
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atssdet.detector import Detector
from atssdet.fileio import atomic_write_text
from atssdet.guard import OutputGuard
from atssdet.options import InferenceOptions
from atssdet.structures import Detections
from atssdet.visualize import DRAW_SCORE_THRESHOLD, save_detections
from atssdet.zoo import coco_category_ids

COMMAND = "predict"  # the written-by mark of predict's outputs (images, JSON, videos)


def predict_files(
    inputs: Sequence[str],
    *,
    detector: Detector,
    out_dir: str | os.PathLike[str],
    batch_size: int | None = None,
    options: InferenceOptions | None = None,
    draw: bool = True,
    draw_threshold: float | None = None,
    coco: bool = False,
    coco_annotations: str | os.PathLike[str] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictReport:
    """Detect objects in files/folders/globs and write drawn images plus one JSON into ``out_dir``.

    ``inputs`` are files, folders (their non-hidden files, sorted, not recursive) or glob patterns.
    ``options`` default to ``detector.options``. Writes, atomically: ``<out_dir>/<image name>`` with
    every detection scoring ``>= draw_threshold`` drawn (default
    :data:`atssdet.visualize.DRAW_SCORE_THRESHOLD`, as the API), and ``predictions.json``
    (``{"model", "images": [...], "failed": [...]}``), or with ``coco=True`` ``predictions_coco.json``
    (a COCO results list) plus ``images_coco.json`` (a COCO dataset skeleton: images + categories,
    for ``COCO(...).loadRes``). Image ids are 1-based positions in the expanded input list (a failed
    file leaves its number unused, so ids do not depend on which files fail), unless
    ``coco_annotations`` (a COCO annotation file) is given, which supplies the ids by file name.
    Unreadable or missing inputs are reported in ``PredictReport.failed`` and skipped.

    Before any image is read, :class:`~atssdet.guard.OutputGuard` refuses outputs that are inputs
    and existing files that ``predict`` did not write (unless ``overwrite``); see :func:`plan_outputs`.
    """
    from tqdm import tqdm

    from atssdet.evaluation.coco import detections_to_coco  # pycocotools; and evaluation imports the detector

    out = Path(out_dir)
    plan = plan_outputs(inputs, out_dir=out, draw=draw, coco=coco, coco_annotations=coco_annotations)
    OutputGuard(COMMAND, inputs=plan.inputs, overwrite=overwrite).check(plan.outputs)
    out.mkdir(parents=True, exist_ok=True)
    threshold = DRAW_SCORE_THRESHOLD if draw_threshold is None else draw_threshold
    files, ids_by_name = plan.files, plan.ids_by_name
    cat_ids = coco_category_ids(detector.cfg.class_names)
    report = PredictReport(out_dir=out, failed=list(plan.failed))
    records: list[dict[str, Any]] = []
    coco_results: list[dict[str, Any]] = []
    coco_images: list[dict[str, Any]] = []
    start = time.perf_counter()
    results = detector.iter_predict(files, batch_size=batch_size, options=options, keep_images=draw)
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
        for index, (path, result) in enumerate(zip(files, results, strict=True)):
            bar.update(1)
            if not result.ok:
                report.failed.append((path, result.error or "unreadable"))
                continue
            image_id = ids_by_name[Path(path).name] if ids_by_name is not None else index + 1
            drawn_path = None
            if draw:
                drawn_path = save_detections(
                    result, plan.drawn[index], score_threshold=threshold, mark=COMMAND
                )
            result.image = None  # free the pixels; only the detections are kept
            h, w = result.image_hw or (0, 0)
            records.append(_record(image_id, path, result, drawn_path))
            report.rows.append(_row(path, result, threshold))
            if coco:
                coco_results += detections_to_coco([result], [image_id], cat_ids)
                coco_images.append({"id": image_id, "file_name": Path(path).name, "height": h, "width": w})
    report.seconds = time.perf_counter() - start
    if coco:
        report.json_path = _write_coco(out, coco_results, coco_images, detector.cfg.class_names, cat_ids)
    else:
        failed_json = [{"file": f, "error": e} for f, e in report.failed]
        doc = {"model": detector.describe(), "images": records, "failed": failed_json}
        report.json_path = atomic_write_text(
            plan.json_paths[0], json.dumps(doc, indent=1) + "\n", mark=COMMAND
        )
    return report


@dataclass(frozen=True)
class OutputPlan:
    """What :func:`predict_files` will read and write, known before any image is read."""

    files: list[str]  # the images, in input order
    ids_by_name: dict[str, int] | None  # COCO image ids by file name (``coco_annotations``), else None
    failed: list[tuple[str, str]]  # ``(input, reason)`` of inputs that are not usable files
    drawn: list[Path]  # the drawn image of ``files[i]`` (empty without drawing)
    json_paths: list[Path]  # predictions.json, or predictions_coco.json + images_coco.json
    annotations: Path | None = None

    @property
    def inputs(self) -> list[str]:
        return [*self.files, *([str(self.annotations)] if self.annotations is not None else [])]

    @property
    def outputs(self) -> list[Path]:
        return [*self.drawn, *self.json_paths]


def plan_outputs(
    inputs: Sequence[str],
    *,
    out_dir: str | os.PathLike[str],
    draw: bool = True,
    coco: bool = False,
    coco_annotations: str | os.PathLike[str] | None = None,
) -> OutputPlan:
    """Expand ``inputs`` and name every file :func:`predict_files` writes into ``out_dir``.

    Drawn images are named after their input (``cat.jpg``; a second ``cat.jpg`` from another folder
    becomes ``cat_2.jpg``; suffixes OpenCV cannot write become ``.jpg``), whether or not the image
    turns out readable, so names do not depend on which files fail.
    """
    out = Path(out_dir)
    files, ids_by_name, failed = _image_files(inputs, coco_annotations)
    used: set[str] = set()
    drawn = [out / _unique_name(Path(f), used) for f in files] if draw else []
    names = ("predictions_coco.json", "images_coco.json") if coco else ("predictions.json",)
    annotations = Path(coco_annotations) if coco_annotations is not None else None
    return OutputPlan(files, ids_by_name, failed, drawn, [out / n for n in names], annotations)


def _image_files(
    inputs: Sequence[str], coco_annotations: str | os.PathLike[str] | None
) -> tuple[list[str], dict[str, int] | None, list[tuple[str, str]]]:
    """``(files, image ids by file name or None, [(input, reason)])``: files not in the annotations fail."""
    files, failed = expand_inputs(inputs)
    if coco_annotations is None:
        return files, None, failed
    ids_by_name = _coco_image_ids(Path(coco_annotations))
    keep = []
    for f in files:
        if Path(f).name in ids_by_name:
            keep.append(f)
        else:
            failed.append((f, f"{f}: not listed in {coco_annotations} (no image id)"))
    return keep, ids_by_name, failed


def _record(image_id: int, path: str, result: Detections, drawn: Path | None) -> dict[str, Any]:
    """One ``predictions.json`` image entry."""
    record = {"image_id": image_id, "file": str(path), **result.to_dict()}
    record["drawn"] = str(drawn) if drawn is not None else None
    del record["source"]
    return record


def _row(path: str, result: Detections, threshold: float) -> PredictRow:
    h, w = result.image_hw or (0, 0)
    return PredictRow(
        path=str(path),
        height=h,
        width=w,
        num_detections=len(result),
        num_drawn=int((result.scores >= threshold).sum()),
        top=_top_names(result, threshold),
    )


def _write_coco(
    out: Path,
    results: list[dict[str, Any]],
    images: list[dict[str, Any]],
    class_names: Sequence[str],
    cat_ids: Sequence[int],
) -> Path:
    """``predictions_coco.json`` (results list) and ``images_coco.json`` (images + categories); the first's path."""
    categories = [{"id": int(i), "name": n} for i, n in zip(cat_ids, class_names, strict=True)]
    path = atomic_write_text(out / "predictions_coco.json", json.dumps(results) + "\n", mark=COMMAND)
    skeleton = {"images": images, "annotations": [], "categories": categories}
    atomic_write_text(out / "images_coco.json", json.dumps(skeleton) + "\n", mark=COMMAND)
    return path


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
        elif os.path.lexists(item) and not glob.has_magic(item):
            add(item)  # a FIFO, socket or broken/looping link: read_image names what is wrong with it
        elif glob.has_magic(item):
            matches = sorted(p for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                failed.append((item, f"{item}: pattern matches no files"))
            for match in matches:
                add(match)
        else:
            failed.append((item, f"{item}: no such file or folder"))
    return files, failed


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
