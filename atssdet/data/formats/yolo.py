"""YOLO (Ultralytics / Darknet) detection datasets: ``data.yaml`` + ``images/`` + ``labels/*.txt``.

Conventions, as Ultralytics reads them:

* ``data.yaml`` (read with PyYAML's ``safe_load``) names the classes (``names``: a list, or a map
  ``{0: name, 1: ...}`` with the ids 0..C-1; an optional ``nc`` must agree) and the splits
  (``train``, ``val``, ``test``: an image folder, a ``.txt`` list of image paths, or a list of
  those), relative to ``path`` (itself relative to the YAML's folder; default: that folder);
* the labels of ``.../images/.../x.jpg`` are in ``.../labels/.../x.txt`` (the last ``images``
  folder of the path becomes ``labels``); an image without a label file has no objects;
* one object per line: ``class cx cy w h``, the centre and size normalised by the image width and
  height (``x = (cx - w / 2) * W`` in COCO pixels); a segment line ``class x1 y1 x2 y2 ...`` becomes
  the box around its points, as Ultralytics does;
* class ``k`` is the COCO category id ``k + 1`` (name ``names[k]``); images get ids 1, 2, ... in
  order (a folder: sorted paths; a list: its order).

Image sizes come from the file headers (:func:`~atssdet.data.formats.common.image_hw`; no image is
decoded). No well-kept library reads this layout with errors naming the file and line (Ultralytics'
own reader drops a bad label file with a warning, and pulls in the whole training framework), so
this reader is written here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from atssdet.data.coco_records import ProblemLog
from atssdet.data.formats.common import (
    IMAGE_SUFFIXES,
    CocoBuilder,
    ForeignDataset,
    finish,
    image_hw,
    new_log,
    number_text,
    parse_number,
    relative_name,
    short,
)
from atssdet.errors import OptionError
from atssdet.fileio import atomic_write_text

SPLIT_KEYS = ("train", "val", "test")


def find_yaml(path: str | os.PathLike[str]) -> Path:
    """The ``data.yaml`` of ``path``: the file itself, or ``data.yaml`` (else the one ``*.yaml``) in the folder."""
    p = Path(path)
    if p.is_dir():
        for name in ("data.yaml", "data.yml", "dataset.yaml"):
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.yaml"))
        if len(found) == 1:
            return found[0]
        raise FileNotFoundError(f"{p}: no data.yaml in the folder")
    return p


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - a dependency of the formats extra
        raise OptionError("reading a YOLO data.yaml needs PyYAML: pip install 'atssdet[formats]'") from exc
    return yaml


def read_data_yaml(path: Path, log: ProblemLog) -> dict[str, Any] | None:
    """The parsed ``data.yaml`` with ``names`` as a list, or None after logging the problem (line named)."""
    yaml = _yaml()

    where = str(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        log.add("bad_data_yaml", where, f"cannot read: {getattr(exc, 'strerror', None) or exc}")
        return None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        log.add("bad_data_yaml", f"{where}{at}", f"not valid YAML ({getattr(exc, 'problem', exc)})")
        return None
    if doc is None:
        log.add("bad_data_yaml", where, "empty file (needs 'names' and a 'train' or 'val' path)")
        return None
    if not isinstance(doc, dict):
        log.add("bad_data_yaml", where, f"expected a mapping of keys, got {type(doc).__name__}")
        return None
    names = _names(doc.get("names"), doc.get("nc"), log, where)
    if names is None:
        return None
    return {**doc, "names": names}


def _names(names: Any, nc: Any, log: ProblemLog, where: str) -> list[str] | None:
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: (not isinstance(k, int), str(k)))
        if keys != list(range(len(names))):
            log.add("bad_data_yaml", f"{where}: names", f"ids must be 0..{len(names) - 1}, got {short(keys)}")
            return None
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        log.add(
            "bad_data_yaml", f"{where}: names", f"needs a non-empty list of class names, got {short(names)}"
        )
        return None
    out = [str(n) for n in names]
    if len(set(out)) != len(out):
        log.add("bad_data_yaml", f"{where}: names", f"class names must be unique, got {short(out)}")
        return None
    if nc is not None and nc != len(out):
        log.add("bad_data_yaml", f"{where}: nc", f"nc is {short(nc)} but 'names' lists {len(out)} classes")
        return None
    return out


def dataset_root(yaml_path: Path, doc: dict[str, Any]) -> Path:
    root = doc.get("path")
    base = yaml_path.parent
    return base if not root else (Path(root) if Path(root).is_absolute() else base / str(root))


def list_splits(path: str | os.PathLike[str]) -> list[str]:
    """The split keys (``train``, ``val``, ``test``) that the ``data.yaml`` of ``path`` names."""
    yaml = _yaml()

    try:
        doc = yaml.safe_load(find_yaml(path).read_text(encoding="utf-8-sig"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    return [k for k in SPLIT_KEYS if isinstance(doc, dict) and doc.get(k)]


def label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, the suffix ``.txt``."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _split_images(entry: Any, root: Path, log: ProblemLog, where: str) -> tuple[list[Path], list[Path]]:
    """(image paths, image folders scanned) of one split entry of data.yaml."""
    images: list[Path] = []
    folders: list[Path] = []
    for item in entry if isinstance(entry, list) else [entry]:
        p = Path(str(item))
        p = p if p.is_absolute() else root / p
        if p.is_dir():
            folders.append(p)
            images += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file())
        elif p.is_file() and p.suffix == ".txt":
            try:
                lines = p.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                log.add("bad_data_yaml", where, f"{p}: cannot read the image list ({exc})")
                continue
            for line in lines:
                if line.strip():
                    q = Path(line.strip())
                    images.append(q if q.is_absolute() else p.parent / q)
        else:
            log.add("bad_data_yaml", where, f"{item!r}: no such image folder or .txt list under {root}")
    return images, folders


def read_yolo(path: str | os.PathLike[str], split: str, *, max_examples: int = 5) -> ForeignDataset:
    """Split ``split`` (``train``, ``val``, ``test``) of the YOLO dataset whose data.yaml is (in) ``path``."""
    yaml_path = find_yaml(path)
    log = new_log(str(yaml_path), max_examples)
    doc = read_data_yaml(yaml_path, log)
    root = yaml_path.parent if doc is None else dataset_root(yaml_path, doc)
    builder = CocoBuilder(doc["names"] if doc else [])
    if doc is not None:
        if not doc.get(split):
            have = [k for k in SPLIT_KEYS if doc.get(k)]
            log.add("bad_data_yaml", str(yaml_path), f"no {split!r} split (it names {have or 'none'})")
        else:
            images, folders = _split_images(doc[split], root, log, f"{yaml_path}: {split}")
            if len(folders) == 1 and all(folders[0] in p.parents for p in images):
                root = folders[0]  # file names relative to the split's image folder
            used = {label_path(p) for p in images}
            for image in images:
                _add_image(builder, image, root, log)
            _orphans(folders, used, log)
    return finish(log, builder, fmt="yolo", source=str(yaml_path), split=split, image_root=root)


def _add_image(builder: CocoBuilder, image: Path, root: Path, log: ProblemLog) -> None:
    hw = image_hw(image)
    if hw is None:
        log.add("image_size_unknown", str(image), "missing or not a readable image")
        return
    height, width = hw
    image_id = builder.add_image(relative_name(image, root), height, width)
    labels = label_path(image)
    try:
        text = labels.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return  # an image without a label file: a background image
    except (OSError, UnicodeDecodeError) as exc:
        log.add("unreadable_label_file", str(labels), getattr(exc, "strerror", None) or str(exc))
        return
    num_classes = len(builder.class_names)
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{labels}:{n}"
        parsed = parse_label_line(line)
        if isinstance(parsed, str):
            log.add("malformed_label", where, parsed)
            continue
        cls, (cx, cy, w, h) = parsed
        if not 0 <= cls < num_classes:
            log.add("class_out_of_range", where, f"class id {cls} out of range 0..{num_classes - 1} "
                    f"(data.yaml names {num_classes} classes)")  # fmt: skip
            continue
        builder.add_box(
            image_id, cls, ((cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height), where
        )


def parse_label_line(line: str) -> tuple[int, tuple[float, float, float, float]] | str:
    """``(class, (cx, cy, w, h))`` of one label line (a segment becomes its bounding box), or the problem."""
    parts = line.split()
    values = [parse_number(p) for p in parts]
    if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
        return f"expected 'class cx cy w h' (5 values) or a segment, got {len(parts)} values: {short(line)}"
    if any(v is None for v in values):
        return f"not a finite number: {short(line)}"
    cls = values[0]
    assert cls is not None
    if not cls.is_integer():
        return f"class id must be a whole number, got {parts[0]!r}"
    nums = [float(v) for v in values[1:] if v is not None]
    if len(nums) == 4:
        return int(cls), (nums[0], nums[1], nums[2], nums[3])
    xs, ys = nums[0::2], nums[1::2]
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
    return int(cls), ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def _orphans(folders: list[Path], used: set[Path], log: ProblemLog) -> None:
    for folder in folders:
        labels = label_path(folder / "x.jpg").parent
        if labels.is_dir() and labels != folder:
            for txt in sorted(labels.rglob("*.txt")):
                if txt not in used:
                    log.add("orphan_label", str(txt), f"no image for it under {folder}")


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def yolo_label_lines(
    boxes_xyxy: Any, labels: Any, image_hw: tuple[int, int], scores: Any | None = None
) -> list[str]:
    """One ``class cx cy w h [score]`` line per box (pixels xyxy, labels 0..C-1), normalised by the image size."""
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    height, width = image_hw
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 / width
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 / height
    w = (boxes[:, 2] - boxes[:, 0]) / width
    h = (boxes[:, 3] - boxes[:, 1]) / height
    cols = np.stack([cx, cy, w, h], axis=1)
    labels_np = np.asarray(labels).reshape(-1).astype(np.int64)
    score_np = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    lines = []
    for i in range(len(boxes)):  # text formatting: one line per box
        line = f"{labels_np[i]} " + " ".join(number_text(v) for v in cols[i])
        if score_np is not None:
            line += f" {score_np[i]:.5f}"
        lines.append(line)
    return lines


def write_yolo_labels(
    detections: Any,
    image_hw: tuple[int, int],
    path: str | os.PathLike[str],
    *,
    with_scores: bool = True,
    mark: str | None = None,
) -> Path:
    """Write ``detections`` (``.boxes`` xyxy pixels, ``.labels`` 0..C-1, ``.scores``; tensors or arrays)
    of an image of ``image_hw`` (H, W) as a YOLO label file (``with_scores``: the score as a 6th
    column, as Ultralytics' ``save_conf``), atomically."""
    scores = _numpy(detections.scores) if with_scores else None
    lines = yolo_label_lines(_numpy(detections.boxes), _numpy(detections.labels), image_hw, scores)
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines), mark=mark)


def write_data_yaml(
    path: Path, names: Iterable[str], splits: dict[str, str], *, mark: str | None = None
) -> Path:
    yaml = _yaml()

    doc: dict[str, Any] = {"path": ".", **splits, "nc": len(list(names)), "names": list(names)}
    return atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), mark=mark)


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
