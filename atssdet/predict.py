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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atssdet.detector import Detector
from atssdet.errors import OptionError
from atssdet.fileio import atomic_path, atomic_write_text
from atssdet.guard import OutputGuard
from atssdet.options import InferenceOptions
from atssdet.predict_labels import label_paths, write_class_list, write_labels
from atssdet.predict_report import PredictReport
from atssdet.predict_stream import (
    COMMAND,
    FORMATS,
    MANIFEST,
    Key,
    RecordSink,
    file_key,
    make_record,
    merged_records,
    part_path,
    record_detections,
    recorded_keys,
    stream_files,
)
from atssdet.structures import Detections
from atssdet.visualize import DRAW_SCORE_THRESHOLD, save_detections
from atssdet.zoo import coco_category_ids

if TYPE_CHECKING:
    from atssdet.ray_predict import RayOptions

__all__ = ["COMMAND", "PredictReport", "expand_inputs", "plan_outputs", "predict_files"]


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
    format: str = "jsonl",
    workers: int = 0,
    engine: str = "local",
    ray: RayOptions | None = None,
    save_format: str | None = None,
) -> PredictReport:
    """Detect objects in files/folders/globs; stream one record per image into ``out_dir``.

    ``inputs`` are files, folders (their non-hidden files, sorted, not recursive) or glob patterns.
    ``options`` default to ``detector.options``. As each image is done its record (file, size, boxes,
    scores, labels, names, or the error) goes to the stream (``format``: ``"jsonl"``, flushed per image,
    or ``"parquet"``; see :mod:`atssdet.predict_stream`) and, with ``draw``, ``<out_dir>/<image name>``
    with the detections scoring ``>= draw_threshold`` drawn (default
    :data:`atssdet.visualize.DRAW_SCORE_THRESHOLD`). Images the stream already holds (same path, size
    and mtime) are skipped: re-running a killed job continues it. At the end, from the stream:
    ``predictions.json`` (``{"model", "images": [...], "failed": [...]}``), or with ``coco=True``
    ``predictions_coco.json`` (a COCO results list) plus ``images_coco.json`` (images + categories, for
    ``COCO(...).loadRes``), and ``predictions.parts.json`` naming every part. Image ids are 1-based
    positions in the expanded input list (a failed file leaves its number unused), unless
    ``coco_annotations`` supplies them by file name. Unreadable inputs are error records, reported in
    ``PredictReport.failed``; the job goes on.

    ``workers`` > 0 decodes and resizes in DataLoader worker processes. Under ``torchrun`` each rank
    takes ``files[rank::world_size]`` and streams its own part; one barrier at the end, then rank 0
    writes the final files. ``engine="ray"`` runs the model in Ray actors (:mod:`atssdet.ray_predict`,
    ``ray``: its options; no drawings). ``save_format`` ``"yolo"``/``"voc"`` also writes a label
    file per image (:mod:`atssdet.predict_labels`). Before any image is read, :class:`~atssdet.guard.OutputGuard`
    refuses outputs that are inputs and existing files ``predict`` did not write (unless ``overwrite``).
    """
    from tqdm import tqdm

    from atssdet import distributed

    if engine not in ENGINES:
        raise OptionError(f"engine: {engine!r} is not one of {', '.join(ENGINES)}")
    draw = draw and engine == "local"
    info = distributed.init_distributed(device=detector.device) if engine == "local" else None
    world = (info.rank, info.world_size) if info is not None else (0, 1)
    out = Path(out_dir)
    plan = plan_outputs(
        inputs,
        out_dir=out,
        draw=draw,
        coco=coco,
        coco_annotations=coco_annotations,
        format=format,
        rank=world,
        save_format=save_format,
    )
    OutputGuard(COMMAND, inputs=plan.inputs, overwrite=overwrite).check(plan.outputs)
    out.mkdir(parents=True, exist_ok=True)
    threshold = DRAW_SCORE_THRESHOLD if draw_threshold is None else draw_threshold
    keys = [file_key(f) for f in plan.files]
    done = recorded_keys(out)
    todo = distributed.shard(list(range(len(keys))), rank=world[0], world_size=world[1])
    skipped = [i for i in todo if keys[i] in done]
    todo = [i for i in todo if keys[i] not in done]
    report = PredictReport(out_dir=out, failed=list(plan.failed), skipped=len(skipped), drew=draw)
    if save_format == "yolo" and world[0] == 0:
        write_class_list(plan.labels[-1], detector.cfg.class_names, mark=COMMAND)
    start = time.perf_counter()
    results = _results(engine, detector, plan.files, todo, batch_size, options, draw, workers, ray, progress)
    with (
        RecordSink(out, format, rank=world[0], world_size=world[1], done=done) as sink,
        tqdm(total=len(todo), unit="img", desc="predict", disable=not progress) as bar,
    ):
        for index, result in results:
            bar.update(1)
            drawn = None
            if draw and result.ok:
                drawn = save_detections(result, plan.drawn[index], score_threshold=threshold, mark=COMMAND)
            result.image = None  # free the pixels; only the record is kept
            if save_format is not None and result.ok:
                name = Path(plan.files[index]).name
                write_labels(result, plan.labels[index], save_format, file_name=name, mark=COMMAND)
            if sink.write(make_record(index, plan.image_id(index), keys[index], result, drawn)):
                report.add(plan.files[index], result, threshold)
    report.seconds = time.perf_counter() - start
    if world[1] > 1:
        distributed.barrier()  # the one collective: every part is complete before rank 0 merges them
    if world[0] == 0:
        report.json_path, report.recorded = write_final(out, plan, keys, detector, coco=coco, format=format)
    return report


ENGINES = ("local", "ray")


def _results(
    engine: str,
    detector: Detector,
    files: list[str],
    todo: list[int],
    batch_size: int | None,
    options: InferenceOptions | None,
    draw: bool,
    workers: int,
    ray: RayOptions | None,
    progress: bool,
) -> Iterator[tuple[int, Detections]]:
    """``(input index, result)`` of each image ``todo``: in order here, as they finish with Ray."""
    if engine == "ray":
        from atssdet.ray_predict import iter_ray_results

        yield from iter_ray_results(
            [files[i] for i in todo],
            todo,
            detector,
            batch_size=batch_size,
            options=options,
            ray=ray,
            progress=progress,
        )
        return
    chosen = (files[i] for i in todo)
    results = detector.iter_predict(
        chosen, batch_size=batch_size, options=options, keep_images=draw, workers=workers
    )
    yield from zip(todo, results, strict=True)


def write_final(
    out: Path,
    plan: OutputPlan,
    keys: list[Key],
    detector: Detector,
    *,
    coco: bool,
    format: str,
) -> tuple[Path, int]:
    """``predictions.json`` or the COCO files, from every part of the stream (read lazily, in input
    order), and the listing of the parts; returns the first JSON's path and the number of images."""
    from atssdet.evaluation.coco import detections_to_coco  # pycocotools; and evaluation imports the detector

    current = {key[0]: (i, key) for i, key in enumerate(keys)}
    names, cat_ids = detector.cfg.class_names, coco_category_ids(detector.cfg.class_names)
    failed = [{"file": f, "error": e} for f, e in plan.failed]
    images = 0
    with atomic_path(plan.json_paths[0], mark=COMMAND) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("[" if coco else '{"model": ' + json.dumps(detector.describe()) + ',\n "images": [')
        coco_images: list[dict[str, Any]] = []
        sep = "\n"
        for record in merged_records(out, current):
            if record.get("error") is not None:
                failed.append({"file": record["file"], "error": record["error"]})
                continue
            images += 1
            image_id = plan.image_id(record["index"])
            if coco:
                dets = record_detections(record, names)
                for entry in detections_to_coco([dets], [image_id], cat_ids):
                    f.write(sep + json.dumps(entry))
                    sep = ",\n"
                name = Path(record["file"]).name
                coco_images.append(
                    {"id": image_id, "file_name": name, "height": record["height"], "width": record["width"]}
                )
            else:
                entry = {"image_id": image_id, **{k: v for k, v in record.items() if k != "image_id"}}
                f.write(sep + json.dumps(entry))
                sep = ",\n"
        f.write("\n]\n" if coco else '\n ],\n "failed": ' + json.dumps(failed, indent=1) + "}\n")
    if coco:
        categories = [{"id": int(i), "name": n} for i, n in zip(cat_ids, names, strict=True)]
        skeleton = {"images": coco_images, "annotations": [], "categories": categories}
        atomic_write_text(out / "images_coco.json", json.dumps(skeleton) + "\n", mark=COMMAND)
    parts = [str(p.relative_to(out)) for p in stream_files(out)]
    listing = {"format": format, "parts": parts, "images": images, "failed": len(failed)}
    atomic_write_text(out / MANIFEST, json.dumps(listing, indent=1) + "\n", mark=COMMAND)
    return plan.json_paths[0], images


@dataclass(frozen=True)
class OutputPlan:
    """What :func:`predict_files` will read and write, known before any image is read."""

    files: list[str]  # the images, in input order
    ids_by_name: dict[str, int] | None  # COCO image ids by file name (``coco_annotations``), else None
    failed: list[tuple[str, str]]  # ``(input, reason)`` of inputs that are not usable files
    drawn: list[Path]  # the drawn image of ``files[i]`` (empty without drawing)
    json_paths: list[Path]  # predictions.json, or predictions_coco.json + images_coco.json
    annotations: Path | None = None
    stream: list[Path] = field(default_factory=list)  # this process's stream part and the listing
    labels: list[Path] = field(default_factory=list)  # ``--save-format`` files (files[i]'s, then classes.txt)

    @property
    def inputs(self) -> list[str]:
        return [*self.files, *([str(self.annotations)] if self.annotations is not None else [])]

    @property
    def outputs(self) -> list[Path]:
        return [*self.drawn, *self.json_paths, *self.stream, *self.labels]

    def image_id(self, index: int) -> int:
        """The image id of ``files[index]``: from the annotations by name, else ``index + 1``."""
        if self.ids_by_name is not None:
            return self.ids_by_name[Path(self.files[index]).name]
        return index + 1


def plan_outputs(
    inputs: Sequence[str],
    *,
    out_dir: str | os.PathLike[str],
    draw: bool = True,
    coco: bool = False,
    coco_annotations: str | os.PathLike[str] | None = None,
    format: str = "jsonl",
    rank: tuple[int, int] = (0, 1),
    save_format: str | None = None,
) -> OutputPlan:
    """Expand ``inputs`` and name every file :func:`predict_files` writes into ``out_dir``.

    ``format`` is the stream's (``jsonl``/``parquet``), ``rank`` the process's ``(rank, world_size)``.
    Drawn images are named after their input (``cat.jpg``; a second ``cat.jpg`` from another folder
    becomes ``cat_2.jpg``; suffixes OpenCV cannot write become ``.jpg``), whether or not the image
    turns out readable, so names do not depend on which files fail.
    """
    out = Path(out_dir)
    files, ids_by_name, failed = _image_files(inputs, coco_annotations)
    used: set[str] = set()
    unique = [_unique_name(Path(f), used) for f in files]
    drawn = [out / n for n in unique] if draw else []
    names = ("predictions_coco.json", "images_coco.json") if coco else ("predictions.json",)
    annotations = Path(coco_annotations) if coco_annotations is not None else None
    if format not in FORMATS:
        raise OptionError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
    # A Parquet part is a new file per chunk (nothing to check but its folder, made on the first write).
    stream = [*([part_path(out, format, *rank)] if format == "jsonl" else []), out / MANIFEST]
    labels = label_paths(out, unique, save_format)
    return OutputPlan(
        files, ids_by_name, failed, drawn, [out / n for n in names], annotations, stream, labels
    )


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
    return unique_stem(path.stem, used, suffix)


def unique_stem(stem: str, used: set[str], suffix: str = "") -> str:
    """``stem + suffix``, else ``stem_2 + suffix``, ``stem_3 + suffix``...: the first not in ``used``
    (added to it). How ``predict`` names outputs of inputs that share a name."""
    name = stem + suffix
    n = 1
    while name in used:
        n += 1
        name = f"{stem}_{n}{suffix}"
    used.add(name)
    return name
