"""Label Studio JSON exports (the "JSON" and the "JSON-MIN" export of an image labelling project).

"JSON" is a list of tasks ``{"data": {"image": URL}, "annotations": [{"result": [...]}]}``; each
``rectanglelabels`` result holds ``original_width``, ``original_height`` and ``value: {x, y, width,
height, rotation, rectanglelabels: [name]}`` with x, y, width, height in percent of the image and
``rotation`` in degrees clockwise about the top-left corner. The first annotation of a task that was
not cancelled is its ground truth (``predictions`` are model output, never read). "JSON-MIN" is a
list of flat tasks ``{"image": URL, "label": [{x, y, width, height, rectanglelabels,
original_width, original_height}]}`` (any key holding such a list).

COCO boxes: ``x = x% * W / 100`` and so on; a rotated rectangle becomes the axis-aligned box around
it. Classes: the labels found, sorted; category ids 1..C in that order. Polygons, key points,
brushes, ellipses are not boxes: counted as a warning and ignored. The image's file name is taken
from its URL: ``/data/local-files/?d=PATH`` gives PATH, any other URL (``/data/upload/3/
8f2a1c3e-cat.jpg``, ``s3://bucket/cat.jpg``) its last part, without the 8-hex-digit prefix Label
Studio gives uploads when only the bare name is in the image folder (``--images``; default:
``images/`` beside the JSON when it exists, else the JSON's folder). An image without boxes takes
its size from the file.

The readers of other projects either need Label Studio's own SDK or report no task or result by
position, so this reader is written here.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from atssdet.data.coco_records import ProblemLog
from atssdet.data.formats.common import (
    IMAGE_SUFFIXES,
    CocoBuilder,
    ForeignDataset,
    finish,
    image_hw,
    image_root,
    new_log,
    short,
)

_NOT_BOXES = {"polygonlabels", "keypointlabels", "brushlabels", "ellipselabels", "polygon", "keypoint"}
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")
Box = tuple[str, tuple[float, float, float, float], str]


def is_labelstudio_json(path: Path) -> bool:
    """A ``.json`` file that opens as a list of objects (``[{``) naming a task's ``"data"`` or
    ``"image"`` in its first 4 KiB. COCO is an object; any other JSON stays COCO's, whose checks
    then say what is wrong with it."""
    if not (path.is_file() and path.suffix.lower() == ".json"):
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return re.match(rb"\s*\[\s*\{", head) is not None and (b'"data"' in head or b'"image"' in head)


def read_labelstudio(path: str | os.PathLike[str], images: str | os.PathLike[str] | None = None, *,
                     max_examples: int = 5) -> ForeignDataset:  # fmt: skip
    """The Label Studio export ``path`` as one split (its images under ``images``)."""
    path = Path(path)
    root = image_root(path, images)
    log = new_log(str(path), max_examples)
    entries: list[tuple[str, int, int, list[Box]]] = []
    tasks = _load(path, log)
    for k, task in enumerate(tasks or [], start=1):
        entry = _task(task, f"{path}: task[{k}]", root, log)
        if entry is not None:
            entries.append(entry)
    names = sorted({box[0] for entry in entries for box in entry[3]})
    index = {n: i for i, n in enumerate(names)}
    builder = CocoBuilder(names)
    for name, height, width, boxes in entries:
        image_id = builder.add_image(name, height, width)
        for label, xywh, where in boxes:
            builder.add_box(image_id, index[label], xywh, where)
    return finish(log, builder, fmt="labelstudio", source=str(path), split=None, image_root=root)


def _load(path: Path, log: ProblemLog) -> list[Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            tasks = json.load(f)
    except OSError as exc:
        log.add("unreadable_label_file", str(path), exc.strerror or str(exc))
        return None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
        log.add("malformed_json", str(path), short(str(exc)))
        return None
    if not isinstance(tasks, list):
        log.add("malformed_json", str(path), f"expected a list of tasks, got {type(tasks).__name__}")
        return None
    return tasks


def _task(task: Any, where: str, root: Path, log: ProblemLog) -> tuple[str, int, int, list[Box]] | None:
    if not isinstance(task, dict):
        log.add("malformed_task", where, f"a task is an object, got {short(task)}")
        return None
    data: dict[str, Any] = task["data"] if isinstance(task.get("data"), dict) else task  # JSON or JSON-MIN
    url = data.get("image") if isinstance(data.get("image"), str) else None
    if url is None:
        url = next((v for v in data.values() if isinstance(v, str) and _looks_like_image(v)), None)
    if url is None:
        log.add("malformed_task", where, "no image URL in its data (expected data.image)")
        return None
    name = image_name(url, root)
    where = f"{where} ({name})"
    results = _results(task)
    boxes: list[Box] = []
    sizes: set[tuple[int, int]] = set()
    ignored = 0
    for j, result in enumerate(results, start=1):
        kind = result.get("type") if isinstance(result, dict) else None
        value = result.get("value", result) if isinstance(result, dict) else None
        if kind in _NOT_BOXES or (kind is None and isinstance(value, dict) and "points" in value):
            ignored += 1
            continue
        if not isinstance(value, dict) or "rectanglelabels" not in value:
            continue  # choices, text areas, ratings: not boxes, nothing to warn about
        box = _box(result, value, f"{where}/result[{j}]", log)
        if box is not None:
            boxes.append(box[0])
            sizes.add(box[1])
    if ignored:
        log.add("unsupported_shape", where, f"{ignored} non-box result(s) ignored", count=ignored)
    if len(sizes) > 1:
        log.add("malformed_task", where, f"results disagree on the image size (W, H): {sorted(sizes)}")
        return None
    if sizes:
        width, height = sizes.pop()
    else:
        hw = image_hw(root / name)
        if hw is None:
            log.add("image_size_unknown", where, f"no box gives its size and {root / name} cannot be read")
            return None
        height, width = hw
    return name, height, width, boxes


def _results(task: dict[str, Any]) -> list[Any]:
    """The ground-truth results: the first annotation not cancelled (JSON), or the result lists (JSON-MIN)."""
    annotations = task.get("annotations")
    if isinstance(annotations, list):
        for ann in annotations:
            if isinstance(ann, dict) and not ann.get("was_cancelled") and isinstance(ann.get("result"), list):
                return ann["result"]
        return []
    return [
        item
        for value in task.values()
        if isinstance(value, list)
        for item in value
        if isinstance(item, dict) and ("rectanglelabels" in item or "points" in item)
    ]


def _box(result: dict[str, Any], value: dict[str, Any], where: str, log: ProblemLog) -> Any:
    """``((label, COCO xywh in pixels, where), (W, H))``, or None after logging why."""
    labels = value.get("rectanglelabels")
    numbers = _numbers(value, ("x", "y", "width", "height"))
    size = _numbers(result, ("original_width", "original_height"))
    rotation = _number(value.get("rotation", 0))
    if not (isinstance(labels, list) and len(labels) == 1 and isinstance(labels[0], str)):
        log.add("malformed_task", where, f"needs one label in rectanglelabels, got {short(labels)}")
        return None
    if numbers is None or rotation is None:
        log.add("malformed_task", where, f"x, y, width, height must be numbers, got {short(value)}")
        return None
    if size is None or not all(s.is_integer() and s > 0 for s in size):
        log.add("malformed_task", where, "needs positive whole original_width / original_height")
        return None
    w_img, h_img = (int(s) for s in size)
    x, y, w, h = numbers
    x, w = x * w_img / 100, w * w_img / 100
    y, h = y * h_img / 100, h * h_img / 100
    if rotation:
        c, s = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
        xs = [x, x + w * c, x + w * c - h * s, x - h * s]
        ys = [y, y + w * s, y + w * s + h * c, y + h * c]
        x, y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    return (labels[0], (x, y, w, h), where), (w_img, h_img)


def image_name(url: str, root: Path) -> str:
    """The file name under ``root`` that Label Studio's image ``url`` stands for (see the module doc)."""
    parsed = urlparse(url)
    local = parse_qs(parsed.query).get("d") if parsed.path.endswith("/data/local-files/") else None
    if local:
        return PurePosixPath(unquote(local[0])).as_posix().lstrip("/")
    name = PurePosixPath(unquote(parsed.path)).name
    bare = _UPLOAD_PREFIX.sub("", name)
    if bare != name and not (root / name).exists() and (root / bare).exists():
        return bare
    return name


def _looks_like_image(text: str) -> bool:
    return PurePosixPath(urlparse(text).path).suffix.lower() in IMAGE_SUFFIXES


def _numbers(mapping: dict[str, Any], keys: tuple[str, ...]) -> list[float] | None:
    """The finite numbers ``mapping[key]`` for each key, or None if one is missing or not a number."""
    values = [_number(mapping.get(k)) for k in keys]
    return [v for v in values if v is not None] if None not in values else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
