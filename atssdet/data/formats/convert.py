"""``data convert``: a dataset from one format to another, split by split, through the COCO structure.

Every split is read and validated (a fatal problem stops before anything is written), then written:

* ``coco``: ``annotations/instances_<split>.json``, images in ``images/<split>/``;
* ``yolo``: ``data.yaml``, ``images/<split>/``, ``labels/<split>/<name>.txt`` (crowd / ``difficult``
  boxes have no YOLO equivalent: they are left out and counted);
* ``voc``: ``Annotations/<name>.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt`` and
  ``classes.txt`` (the class order); coordinates rounded to whole pixels as VOC stores them.

Images are hard-linked (copied where the file system cannot link) through :mod:`atssdet.fileio`;
every output is checked by the one output guard first (never the inputs, never files another
command wrote unless ``overwrite``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from atssdet.data.coco_records import CocoFile
from atssdet.data.coco_schema import load_coco_file
from atssdet.data.formats import FormatError, detect_format, list_splits, read_split
from atssdet.data.formats.voc import voc_xml
from atssdet.data.formats.yolo import write_data_yaml, yolo_label_lines
from atssdet.fileio import atomic_link, atomic_write_json, atomic_write_text
from atssdet.guard import OutputGuard

COMMAND = "data convert"
TARGETS = ("coco", "yolo", "voc")


@dataclass
class ConvertSummary:
    out: Path
    splits: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (images, boxes)
    dropped_crowd: int = 0
    files: int = 0


@dataclass(frozen=True)
class _Split:
    name: str
    coco: CocoFile
    image_root: Path


def read_splits(src: str | os.PathLike[str], from_format: str | None, *, images: str | None = None,
                split: str | None = None) -> tuple[str, list[_Split]]:  # fmt: skip
    """(format, the validated splits) of ``src``; a fatal problem raises naming the file and entry."""
    fmt = from_format or detect_format(src)
    names = [split] if split else list_splits(src, fmt)
    if not names:
        raise FormatError(f"{src}: no split found to convert")
    out = []
    for name in names:
        if fmt == "coco":
            path = Path(src)
            ann = path if path.is_file() else path / "annotations" / f"instances_{name}.json"
            coco = load_coco_file(ann)
            root = Path(images) if images else _coco_images(path, name)
        else:
            ds = read_split(src, fmt, name, images=images)
            coco, root = ds.coco(max_examples=1, warnings=False).raise_if_fatal(), ds.image_root
        out.append(_Split(name or "train", coco, root))
    return fmt, out


def _coco_images(path: Path, split: str | None) -> Path:
    if path.is_file():
        raise FormatError(f"{path} is a JSON file: give its image folder too (--images)")
    for cand in (path / "images" / str(split), path / str(split), path / str(split) / "images"):
        if cand.is_dir():
            return cand
    raise FormatError(f"{path}: no image folder for split {split!r}")


def convert_dataset(src: str | os.PathLike[str], to_format: str, out: str | os.PathLike[str], *,
                    from_format: str | None = None, images: str | None = None, split: str | None = None,
                    overwrite: bool = False) -> ConvertSummary:  # fmt: skip
    """Convert the dataset at ``src`` into ``to_format`` under ``out`` (see the module doc)."""
    if to_format not in TARGETS:
        raise FormatError(f"--to must be one of {', '.join(TARGETS)}, got {to_format!r}")
    _, splits = read_splits(src, from_format, images=images, split=split)
    out = Path(out)
    plan = [(dst, what) for dst, what in _plan(splits, to_format, out) if not _already_linked(dst, what)]
    outputs = [dst for dst, _ in plan]
    if len(set(outputs)) != len(outputs):
        raise FormatError(f"{out}: two images of the splits would be written to the same file")
    inputs = [src, *(s.image_root / r.file_name for s in splits for r in s.coco.images.values())]
    OutputGuard(COMMAND, inputs=inputs, overwrite=overwrite).check(outputs)
    summary = ConvertSummary(out)
    for dst, what in plan:
        if isinstance(what, Path):
            dst.parent.mkdir(parents=True, exist_ok=True)
            atomic_link(what, dst)
        elif isinstance(what, bytes):
            atomic_write_text(dst, what.decode("utf-8"), mark=COMMAND)
        elif isinstance(what, str):
            atomic_write_text(dst, what, mark=COMMAND)
        elif isinstance(what, _DataYaml):
            write_data_yaml(dst, what.names, what.splits, mark=COMMAND)
        else:
            atomic_write_json(dst, what, mark=COMMAND)
        summary.files += 1
    for s in splits:
        table = s.coco.annotations
        summary.splits[s.name] = (len(s.coco.images), len(table.image_ids))
        if to_format == "yolo":
            summary.dropped_crowd += int(table.iscrowd.sum())
    return summary


def _already_linked(dst: Path, what: Any) -> bool:
    """An image output that already is its source (a hard link of an earlier run): nothing to write."""
    try:
        return isinstance(what, Path) and dst.exists() and os.path.samefile(dst, what)
    except OSError:
        return False


def coco_dict(coco: CocoFile) -> dict[str, Any]:
    """The COCO ``instances`` document of a validated split (categories and images in id order)."""
    t = coco.annotations
    anns = [
        {"id": i + 1, "image_id": int(t.image_ids[i]), "category_id": int(t.category_ids[i]),
         "bbox": t.boxes_xywh[i].tolist(), "area": float(t.boxes_xywh[i, 2] * t.boxes_xywh[i, 3]),
         "iscrowd": int(t.iscrowd[i])}
        for i in range(len(t.image_ids))
    ]  # fmt: skip
    return {
        "images": [
            {"id": r.image_id, "file_name": r.file_name, "height": r.height, "width": r.width}
            for r in coco.sorted_images()
        ],
        "annotations": anns,
        "categories": [{"id": k, "name": coco.categories[k]} for k in sorted(coco.categories)],
    }


def _per_image(coco: CocoFile) -> dict[int, np.ndarray]:
    """image id -> row indices of its annotations (table order)."""
    ids = coco.annotations.image_ids
    order = np.argsort(ids, kind="stable")
    keys, starts = np.unique(ids[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {int(k): order[a:b] for k, a, b in zip(keys, starts, ends, strict=True)}


def _plan(splits: list[_Split], to_format: str, out: Path) -> Iterator[tuple[Path, Any]]:
    """(output path, what to write there: a source image Path, text, bytes or a JSON document)."""
    names: list[str] = []
    for s in splits:
        for k in sorted(s.coco.categories):
            if s.coco.categories[k] not in names:
                names.append(s.coco.categories[k])
    yolo_splits = {}
    for s in splits:
        rows = _per_image(s.coco)
        cats = {k: names.index(v) for k, v in s.coco.categories.items()}
        if to_format == "coco":
            yield out / "annotations" / f"instances_{s.name}.json", coco_dict(s.coco)
        listing = []
        for r in s.coco.sorted_images():
            rel = PurePosixPath(r.file_name)
            src = s.image_root / r.file_name
            at = rows.get(r.image_id, np.zeros(0, np.int64))
            t = s.coco.annotations
            if to_format in ("coco", "yolo"):
                yield out / "images" / s.name / rel, src
            if to_format == "yolo":
                keep = at[~t.iscrowd[at]]
                xyxy = t.boxes_xywh[keep].copy()
                xyxy[:, 2:] += xyxy[:, :2]
                labels = [cats[int(c)] for c in t.category_ids[keep]]
                lines = yolo_label_lines(xyxy, labels, (r.height, r.width))
                yield out / "labels" / s.name / rel.with_suffix(".txt"), "".join(f"{x}\n" for x in lines)
            elif to_format == "voc":
                objects = [(s.coco.categories[int(t.category_ids[i])], tuple(t.boxes_xywh[i].tolist()),
                            bool(t.iscrowd[i]), None) for i in at]  # fmt: skip
                yield out / "JPEGImages" / rel, src
                yield (
                    out / "Annotations" / rel.with_suffix(".xml"),
                    voc_xml(str(rel), (r.height, r.width), objects),
                )
                listing.append(str(rel.with_suffix("")))
        if to_format == "voc":
            yield out / "ImageSets" / "Main" / f"{s.name}.txt", "".join(f"{x}\n" for x in listing)
        yolo_splits[s.name] = f"images/{s.name}"
    if to_format == "voc":
        yield out / "classes.txt", "".join(f"{n}\n" for n in names)
    if to_format == "yolo":
        yield out / "data.yaml", _DataYaml(names, yolo_splits)


@dataclass(frozen=True)
class _DataYaml:
    names: list[str]
    splits: dict[str, str]
