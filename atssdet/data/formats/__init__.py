"""Datasets in YOLO, Pascal VOC, CVAT and Label Studio formats, read into the one COCO structure; conversions.

:func:`resolve_split` finds what ``--data`` names (a COCO JSON or root, a YOLO ``data.yaml`` or its
folder, a VOC root, a CVAT XML, a Label Studio JSON export: :func:`detect_format`), and returns the split as ``train``,
``eval`` and ``data check`` take it: a COCO JSON path, or a :class:`ForeignDataset` (which is
``os.PathLike``: its ``os.fspath`` is the file it came from) whose :meth:`ForeignDataset.coco` is
the split validated by the COCO schema. ``docs/data-formats.md`` lists the conventions.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from atssdet.data.formats.common import FORMAT_PROBLEMS, FORMATS, ForeignDataset

__all__ = ["FORMATS", "FORMAT_PROBLEMS", "ForeignDataset", "ResolvedSplit", "detect_format", "read_split",
           "resolve_split"]  # fmt: skip


class FormatError(ValueError):
    """``--data`` names no dataset of a known layout, or not the split asked for."""


def detect_format(path: str | os.PathLike[str]) -> str:
    """``coco``, ``yolo``, ``voc``, ``cvat`` or ``labelstudio`` from the file name / folder layout of
    ``path`` (a ``.json`` holding a list of task objects is a Label Studio export, any other COCO's:
    :func:`~atssdet.data.formats.labelstudio.is_labelstudio_json`)."""
    from atssdet.data.formats.cvat import is_cvat_xml
    from atssdet.data.formats.labelstudio import is_labelstudio_json
    from atssdet.data.formats.voc import is_voc_root

    p = Path(path)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".json":
            return "labelstudio" if is_labelstudio_json(p) else "coco"
        if suffix in (".yaml", ".yml"):
            return "yolo"
        if suffix == ".xml":
            return "cvat"
        raise FormatError(f"{p}: not a dataset file (expected .json, data.yaml or a CVAT .xml)")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if is_voc_root(p):
        return "voc"
    if any((p / n).is_file() for n in ("data.yaml", "data.yml", "dataset.yaml")):
        return "yolo"
    if is_cvat_xml(p / "annotations.xml"):
        return "cvat"
    if (p / "annotations").is_dir() or any(p.glob("*.json")):
        return "coco"
    raise FormatError(
        f"{p}: no known dataset layout (COCO annotations/*.json, YOLO data.yaml, VOC Annotations/, "
        "CVAT annotations.xml); name it with --data-format"
    )


@dataclasses.dataclass(frozen=True)
class ResolvedSplit:
    """A split as the commands take it: ``annotations`` a COCO JSON path or a :class:`ForeignDataset`."""

    format: str
    annotations: str | ForeignDataset
    image_root: str


def read_split(path: str | os.PathLike[str], data_format: str, split: str | None, *,
               images: str | os.PathLike[str] | None = None, max_examples: int = 5) -> ForeignDataset:  # fmt: skip
    """Read split ``split`` of the YOLO / VOC / CVAT / Label Studio dataset at ``path``."""
    from atssdet.data.formats import cvat, labelstudio, voc, yolo

    if data_format == "yolo":
        ds = yolo.read_yolo(path, split or "train", max_examples=max_examples)
    elif data_format == "voc":
        root = Path(path)
        ds = voc.read_voc(
            root, split if split or not voc.list_splits(root) else "train", max_examples=max_examples
        )
    elif data_format == "cvat":
        p = Path(path)
        ds = cvat.read_cvat(p / "annotations.xml" if p.is_dir() else p, images, max_examples=max_examples)
    elif data_format == "labelstudio":
        ds = labelstudio.read_labelstudio(path, images, max_examples=max_examples)
    else:
        raise FormatError(f"unknown data format {data_format!r}; expected one of {', '.join(FORMATS)}")
    if images is not None and data_format not in ("cvat", "labelstudio"):
        ds = dataclasses.replace(ds, image_root=Path(images))
    return ds


def resolve_split(
    path: str | os.PathLike[str],
    *,
    data_format: str | None = None,
    split: str | None = None,
    images: str | os.PathLike[str] | None = None,
    default_splits: tuple[str, ...] = ("train2017", "train"),
    flag: str = "--data",
    max_examples: int = 5,
) -> ResolvedSplit:
    """The split ``--data PATH [--images DIR] [--split S] [--data-format F]`` names (see the module doc).

    ``default_splits``: the COCO / YOLO / VOC split names tried in turn when ``split`` is None.
    """
    if not Path(path).exists():
        if Path(path).suffix.lower() == ".json" and images is not None:
            return ResolvedSplit("coco", str(path), str(images))  # the COCO schema names the missing file
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    fmt = data_format or detect_format(path)
    if fmt not in FORMATS:
        raise FormatError(f"{flag}: unknown data format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if fmt == "coco":
        ann, root = _coco_split(Path(path), images, split, default_splits, flag)
        return ResolvedSplit("coco", ann, root)
    chosen = split
    if chosen is None and fmt in ("yolo", "voc"):
        chosen = _pick_split(Path(path), fmt, default_splits)
    ds = read_split(path, fmt, chosen, images=images, max_examples=max_examples)
    return ResolvedSplit(fmt, ds, str(ds.image_root))


def list_splits(path: str | os.PathLike[str], data_format: str) -> list[str | None]:
    """The splits of a dataset (``[None]`` for a CVAT file or a VOC root without ImageSets)."""
    from atssdet.data.formats import voc, yolo

    if data_format == "yolo":
        return [*yolo.list_splits(path)]
    if data_format == "voc":
        return [*voc.list_splits(path)] or [None]
    if data_format == "coco":
        p = Path(path)
        if p.is_file():
            return [None]
        return [
            *sorted(q.stem.removeprefix("instances_") for q in (p / "annotations").glob("instances_*.json"))
        ]
    return [None]


def _pick_split(path: Path, fmt: str, default_splits: tuple[str, ...]) -> str | None:
    found = list_splits(path, fmt)
    for name in (*default_splits, *(s.removesuffix("2017") for s in default_splits)):
        if name in found:
            return name
    return None if fmt == "voc" and found == [None] else default_splits[-1]


def _coco_split(path: Path, images: str | os.PathLike[str] | None, split: str | None,
                default_splits: tuple[str, ...], flag: str) -> tuple[str, str]:  # fmt: skip
    from atssdet.data.coco import find_coco_split

    if path.is_file():
        if images is None:
            raise FormatError(f"{flag} {path} is a JSON file: give its image folder too (--images)")
        return str(path), str(images)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")
    errors = []
    for name in [split] if split else list(default_splits):
        try:
            ann, image_dir = find_coco_split(path, name)
        except ValueError as exc:  # DatasetError
            errors.append(str(exc))
            continue
        return str(ann), str(images) if images is not None else str(image_dir)
    raise FileNotFoundError(f"{flag} {path}: no split found ({'; '.join(errors)})")
