"""Pascal VOC detection datasets: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/<split>.txt``.

Conventions:

* a ``bndbox`` holds 1-based, inclusive pixel coordinates: pixel column ``xmin`` is the COCO
  interval ``[xmin - 1, xmin]``, so the COCO box is ``x = xmin - 1``, ``w = xmax - xmin + 1`` (and
  the same for y), as Detectron2 and the VOC devkit read it; written back as ``xmin = round(x) + 1``,
  ``xmax = round(x + w)`` (whole pixels, as VOC stores them: within 0.5 px of the COCO box);
* ``difficult`` 1 becomes COCO ``iscrowd`` 1: an ignore region in evaluation, not a training target
  (what the VOC protocol does with it); written back from ``iscrowd``;
* the classes are those of ``classes.txt`` (one name a line) or CVAT's ``labelmap.txt`` at the root
  when present, in their order; else the 20 VOC classes when every name is one of them; else the
  names found, sorted. Category ids are 1..C in that order;
* the images are those listed in ``ImageSets/Main/<split>.txt`` (their order), or every XML file
  sorted when the split is not given; an image is ``JPEGImages/<filename>`` of its XML.

Errors name the XML file and the element (``object[2]/bndbox/xmax``). XML is parsed with defusedxml
(see :func:`~atssdet.data.formats.common.parse_xml`). No maintained library reads VOC with errors
that name the element, so this reader is written here (it is ~100 lines of ElementTree).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atssdet.data.coco_records import ProblemLog
from atssdet.data.formats.common import (
    CocoBuilder,
    ForeignDataset,
    finish,
    image_hw,
    new_log,
    parse_number,
    parse_xml,
    short,
    text_of,
)
from atssdet.fileio import atomic_write_bytes

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
CLASS_FILES = ("classes.txt", "labelmap.txt")
_Object = tuple[str, tuple[float, float, float, float], bool, str]  # name, xywh, difficult, where


def is_voc_root(path: Path) -> bool:
    return path.is_dir() and (path / "Annotations").is_dir()


def list_splits(root: str | os.PathLike[str]) -> list[str]:
    main = Path(root) / "ImageSets" / "Main"
    return sorted(p.stem for p in main.glob("*.txt") if "_" not in p.stem) if main.is_dir() else []


def read_class_file(root: Path) -> list[str] | None:
    """The class list of ``classes.txt`` / ``labelmap.txt`` (``name:colour:parts:actions``) at ``root``."""
    for name in CLASS_FILES:
        path = root / name
        if path.is_file():
            names = []
            for line in path.read_text(encoding="utf-8-sig").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    names.append(line.split(":", 1)[0] if name == "labelmap.txt" else line)
            return [n for n in names if n != "background" or name != "labelmap.txt"]
    return None


def read_voc(root: str | os.PathLike[str], split: str | None, *, max_examples: int = 5) -> ForeignDataset:
    """Split ``split`` (None: every XML file) of the VOC dataset at ``root``."""
    root = Path(root)
    log = new_log(str(root), max_examples)
    stems = _split_stems(root, split, log)
    parsed = [(stem, _read_xml(root / "Annotations" / f"{stem}.xml", log)) for stem in stems]
    given = read_class_file(root)
    found = sorted({o[0] for _, entry in parsed if entry is not None for o in entry[3]})
    names = given if given is not None else (list(VOC_CLASSES) if set(found) <= set(VOC_CLASSES) else found)
    index = {n: i for i, n in enumerate(names)}
    builder = CocoBuilder(names)
    image_root = root / "JPEGImages"
    for stem, entry in parsed:
        if entry is None:
            continue
        file_name, height, width, objects = entry
        if height is None or width is None:
            hw = image_hw(image_root / file_name)
            if hw is None:
                log.add("image_size_unknown", f"{root / 'Annotations' / stem}.xml",
                        f"no <size> and cannot read {image_root / file_name}")  # fmt: skip
                continue
            height, width = hw
        image_id = builder.add_image(file_name, height, width)
        for name, xywh, difficult, where in objects:
            if name not in index:
                log.add("unknown_class", where, f"{name!r} is not in the class list ({short(names)})")
                continue
            builder.add_box(image_id, index[name], xywh, where, crowd=difficult)
    return finish(log, builder, fmt="voc", source=str(root), split=split, image_root=image_root)


def _split_stems(root: Path, split: str | None, log: ProblemLog) -> list[str]:
    if split is None:
        return sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    try:
        lines = listing.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        log.add("unreadable_label_file", str(listing), f"split {split!r}: {exc.strerror or exc}")
        return []
    return [_stem(line) for line in lines if line.strip()]


def _stem(line: str) -> str:
    """The image id of an ImageSets line: the whole line, but for a ``<class>_<split>.txt``-style
    ``id 1`` / ``id -1`` line (the id may hold spaces: it names a file)."""
    parts = line.strip().rsplit(None, 1)
    return parts[0] if len(parts) == 2 and parts[1] in ("-1", "0", "1") else line.strip()


def _read_xml(path: Path, log: ProblemLog) -> tuple[str, int | None, int | None, list[_Object]] | None:
    """(file name, height, width, objects) of one annotation file, or None after logging why."""
    root = parse_xml(path, log, str(path))
    if root is None:
        return None
    file_name = text_of(root, "filename") or f"{path.stem}.jpg"
    height = width = None
    size = root.find("size")
    if size is not None:
        h, w = parse_number(text_of(size, "height")), parse_number(text_of(size, "width"))
        if h is None or w is None or not (h.is_integer() and w.is_integer()) or h < 0 or w < 0:
            log.add("malformed_element", f"{path}: size", "height/width must be whole numbers")
            return None
        if h > 0 and w > 0:  # some tools write 0 when they did not know: then read the image header
            height, width = int(h), int(w)
    objects = []
    for k, obj in enumerate(root.findall("object"), start=1):
        where = f"{path}: object[{k}]"
        parsed = _object(obj, where, log)
        if parsed is not None:
            objects.append(parsed)
    return file_name, height, width, objects


def _object(obj: Any, where: str, log: ProblemLog) -> _Object | None:
    name = text_of(obj, "name")
    if not name:
        log.add("malformed_element", f"{where}/name", "missing or empty class name")
        return None
    difficult = text_of(obj, "difficult") or "0"
    if difficult not in ("0", "1"):
        log.add("malformed_element", f"{where}/difficult", f"must be 0 or 1, got {short(difficult)}")
        return None
    box = obj.find("bndbox")
    if box is None:
        log.add("malformed_element", f"{where}/bndbox", "missing")
        return None
    values = []
    for tag in ("xmin", "ymin", "xmax", "ymax"):
        value = parse_number(text_of(box, tag))
        if value is None:
            log.add(
                "malformed_element",
                f"{where}/bndbox/{tag}",
                f"not a finite number: {short(text_of(box, tag))}",
            )
            return None
        values.append(value)
    xmin, ymin, xmax, ymax = values
    return name, (xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1), difficult == "1", where


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def voc_xml(
    file_name: str,
    image_hw: tuple[int, int],
    objects: Sequence[tuple[str, Sequence[float], bool, float | None]],
    *,
    whole_pixels: bool = True,
) -> bytes:
    """A VOC annotation document; ``objects``: (class name, COCO ``[x, y, w, h]``, difficult, score or None).

    ``whole_pixels`` rounds to VOC's integer coordinates (else 2 decimals, for predictions)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", image_hw[1]), ("height", image_hw[0]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for name, (x, y, w, h), difficult, score in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "1" if difficult else "0"
        if score is not None:
            ET.SubElement(obj, "score").text = f"{score:.5f}"
        box = ET.SubElement(obj, "bndbox")
        for tag, coord in zip(("xmin", "ymin", "xmax", "ymax"), (x + 1, y + 1, x + w, y + h), strict=True):
            # whole pixels: xmin = round(x) + 1, xmax = round(x + w)
            whole = round(coord - 1) + 1 if tag[1:] == "min" else round(coord)
            ET.SubElement(box, tag).text = str(whole) if whole_pixels else f"{coord:.2f}"
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def write_voc_xml(
    detections: Any,
    image_hw: tuple[int, int],
    path: str | os.PathLike[str],
    *,
    class_names: list[str] | tuple[str, ...],
    file_name: str,
    with_scores: bool = True,
    mark: str | None = None,
) -> Path:
    """Write ``detections`` (``.boxes`` xyxy pixels, ``.labels`` 0..C-1, ``.scores``) of the image
    ``file_name`` of size ``image_hw`` (H, W) as a VOC annotation file, atomically. Coordinates are
    VOC's 1-based inclusive ones with 2 decimals (``xmin = x1 + 1``, ``xmax = x2``); ``with_scores``
    adds a ``<score>`` element to each object (VOC readers ignore unknown elements)."""
    boxes = _numpy(detections.boxes).reshape(-1, 4).astype(float)
    labels = _numpy(detections.labels).reshape(-1).astype(int)
    scores = _numpy(detections.scores).reshape(-1).astype(float)
    objects = [
        (class_names[labels[i]], (b[0], b[1], b[2] - b[0], b[3] - b[1]), False,
         float(scores[i]) if with_scores else None)
        for i, b in enumerate(boxes.tolist())
    ]  # fmt: skip
    data = voc_xml(file_name, image_hw, objects, whole_pixels=False)
    return atomic_write_bytes(path, data, mark=mark)


def _numpy(value: Any) -> Any:
    import numpy as np

    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
