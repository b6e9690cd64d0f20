"""CVAT for images 1.1 XML (``annotations.xml`` of a CVAT task or project export).

``<image id name width height>`` elements hold ``<box label xtl ytl xbr ybr>`` shapes in continuous
pixel coordinates (``xtl, ytl`` the top-left corner, ``xbr, ybr`` the bottom-right: COCO
``x = xtl``, ``w = xbr - xtl``). The classes are the ``<label>`` entries of ``<meta>`` (task, job or
project) in their order, else the box labels found, sorted; category ids are 1..C in that order. A
box whose ``<attribute name="difficult">`` is true becomes COCO ``iscrowd`` (ignored in
evaluation). Polygons, polylines, points, ellipses, masks, cuboids and skeletons are not boxes: they
are counted as a warning and ignored. Images keep the file order; ``name`` is relative to the image
folder (``--images``; default: ``images/`` beside the XML when it exists, else the XML's folder).

The file is streamed (``iterparse``; each ``<image>`` freed once read) through defusedxml. The
``datumaro`` project reads CVAT too but is a large framework whose errors do not name the element,
so this reader is written here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from atssdet.data.coco_records import ProblemLog
from atssdet.data.formats.common import (
    CocoBuilder,
    ForeignDataset,
    finish,
    image_root,
    iter_xml,
    new_log,
    parse_number,
    short,
    xml_parser,
)

_SHAPES = {"polygon", "polyline", "points", "ellipse", "mask", "cuboid", "skeleton"}


def is_cvat_xml(path: Path) -> bool:
    """An ``.xml`` file whose root element is ``<annotations>`` (read from its first 4 KiB)."""
    if not (path.is_file() and path.suffix.lower() == ".xml"):
        return False
    try:
        head = path.read_bytes()[:4096].decode("utf-8", "replace")
    except OSError:
        return False
    return "<annotations" in head


def read_cvat(path: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
              max_examples: int = 5) -> ForeignDataset:  # fmt: skip
    """The CVAT for images 1.1 file ``path`` as one split (its images under ``images``)."""
    path = Path(path)
    log = new_log(str(path), max_examples)
    meta_labels: list[str] = []
    entries: list[tuple[str, int, int, list[tuple[str, tuple[float, float, float, float], bool, str]]]] = []
    _, errors = xml_parser()
    try:
        _stream(path, log, meta_labels, entries)
    except OSError as exc:
        log.add("unreadable_label_file", str(path), exc.strerror or str(exc))
    except errors as exc:
        position = getattr(exc, "position", None)
        at = f"line {position[0]}, column {position[1] + 1}: " if position else ""
        log.add("malformed_xml", str(path), f"{at}{exc}")
        entries.clear()
    found = sorted({b[0] for e in entries for b in e[3]})
    names = meta_labels or found
    index = {n: i for i, n in enumerate(names)}
    builder = CocoBuilder(names)
    for name, height, width, boxes in entries:
        image_id = builder.add_image(name, height, width)
        for label, xywh, difficult, where in boxes:
            if label not in index:
                log.add(
                    "unknown_class", where, f"label {label!r} is not among the <meta> labels {short(names)}"
                )
                continue
            builder.add_box(image_id, index[label], xywh, where, crowd=difficult)
    root = image_root(path, images)
    return finish(log, builder, fmt="cvat", source=str(path), split=None, image_root=root)


def _stream(path: Path, log: ProblemLog, meta_labels: list[str], entries: list[Any]) -> None:
    stack: list[str] = []
    k = 0
    for event, elem in iter_xml(path):
        if event == "start":
            stack.append(elem.tag)
            continue
        stack.pop()
        if elem.tag == "name" and stack[-2:] == ["labels", "label"] and "meta" in stack and elem.text:
            if elem.text.strip() not in meta_labels:
                meta_labels.append(elem.text.strip())
        elif elem.tag == "image" and stack == ["annotations"]:
            k += 1
            entry = _image(elem, f"{path}: image[{k}]", log)
            if entry is not None:
                entries.append(entry)
            elem.clear()  # streaming: what is read is freed


def _image(elem: Any, where: str, log: ProblemLog) -> Any:
    name = elem.get("name")
    where = f"{where} (name {name!r})" if name else where
    h, w = parse_number(elem.get("height")), parse_number(elem.get("width"))
    if not name or h is None or w is None or not (h.is_integer() and w.is_integer()) or h <= 0 or w <= 0:
        log.add("malformed_element", where, "needs 'name' and positive whole 'width'/'height' attributes")
        return None
    boxes = []
    shapes = 0
    for j, shape in enumerate(elem, start=1):
        if shape.tag in _SHAPES:
            shapes += 1
            continue
        if shape.tag != "box":
            continue
        at = f"{where}/box[{j}]"
        coords = [parse_number(shape.get(a)) for a in ("xtl", "ytl", "xbr", "ybr")]
        label = shape.get("label")
        if not label or any(c is None for c in coords):
            log.add(
                "malformed_element",
                at,
                f"needs 'label' and numeric xtl/ytl/xbr/ybr, got {short(dict(shape.attrib))}",
            )
            continue
        x1, y1, x2, y2 = (float(c) for c in coords if c is not None)
        difficult = any(
            a.get("name") == "difficult" and (a.text or "").strip().lower() in ("true", "1")
            for a in shape.findall("attribute")
        )
        boxes.append((label, (x1, y1, x2 - x1, y2 - y1), difficult, at))
    if shapes:
        log.add("unsupported_shape", where, f"{shapes} non-box shape(s) ignored", count=shapes)
    return name, int(h), int(w), boxes
