"""What the format readers share: their problem kinds, the in-memory COCO they build, safe XML.

Every reader (:mod:`.yolo`, :mod:`.voc`, :mod:`.cvat`, :mod:`.labelstudio`) turns its files into one COCO ``instances``
dict (:class:`CocoBuilder`) and a location per annotation (``labels/train/a.txt:3``,
``Annotations/a.xml: object[2]``); :meth:`ForeignDataset.coco` validates that dict with the one COCO
schema (:func:`atssdet.data.coco_schema.validate_coco`), so ``train``, ``eval`` and ``data check`` see
the structure and the verdict a COCO file gets, and box problems name the file and line or element.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atssdet.data.coco_records import BoxStatus, CocoFile, Problem, ProblemLog, Severity, short
from atssdet.data.coco_schema import validate_coco

FORMATS = ("coco", "yolo", "voc", "cvat", "labelstudio")

# code -> (severity, description): problems only a reader of the format can see (file and line named).
FORMAT_PROBLEMS: dict[str, tuple[Severity, str]] = {
    "unreadable_label_file": ("fatal", "label or annotation file missing or unreadable"),
    "malformed_xml": ("fatal", "XML that does not parse (not well-formed, or entity declarations refused)"),
    "malformed_element": (
        "fatal",
        "XML element missing or malformed (e.g. a bndbox value that is no number)",
    ),
    "bad_data_yaml": ("fatal", "data.yaml empty, not YAML, or without valid 'names' and split paths"),
    "malformed_label": ("fatal", "label line malformed (needs 'class cx cy w h' of finite numbers)"),
    "class_out_of_range": ("fatal", "class id outside the class list"),
    "unknown_class": ("fatal", "class name not in the class list"),
    "malformed_json": ("fatal", "JSON that does not parse, or not a list of Label Studio tasks"),
    "malformed_task": (
        "fatal",
        "Label Studio task or result missing or malformed (e.g. a box value that is no number)",
    ),
    "image_size_unknown": ("fatal", "image whose size cannot be read (missing file, or not an image)"),
    "orphan_label": ("warning", "label file without an image (ignored)"),
    "unsupported_shape": ("warning", "shape other than a box (polygon, points, ...; ignored)"),
}

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".jpe", ".png", ".tif", ".tiff", ".webp", ".jp2"})

# COCO box-problem codes whose examples are rewritten with the file and line of the box.
_BOX_CODES = {
    "degenerate_box": BoxStatus.DEGENERATE,
    "box_outside_image": BoxStatus.OUTSIDE,
    "box_partly_outside": BoxStatus.PARTLY_OUTSIDE,
}


class CocoBuilder:
    """A COCO ``instances`` dict built image by image: category ids 1..C in ``class_names`` order,
    image and annotation ids 1, 2, ... in the order they are added, and a location per annotation."""

    def __init__(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.locations: list[str] = []

    def add_image(self, file_name: str, height: int, width: int) -> int:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        return image_id

    def add_box(self, image_id: int, label: int, xywh: tuple[float, float, float, float], where: str, *,
                crowd: bool = False) -> None:  # fmt: skip
        """A box of class ``label`` (0-based index into ``class_names``) in COCO pixels ``[x, y, w, h]``."""
        x, y, w, h = (float(v) for v in xywh)
        self.annotations.append(
            {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": label + 1,
             "bbox": [x, y, w, h], "area": max(w, 0.0) * max(h, 0.0), "iscrowd": int(crowd)}
        )  # fmt: skip
        self.locations.append(where)

    def dataset(self) -> dict[str, Any]:
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return {"images": self.images, "annotations": self.annotations, "categories": categories}


@dataclass
class ForeignDataset:
    """One split of a YOLO / VOC / CVAT / Label Studio dataset, read into a COCO dict (see the module doc)."""

    format: str
    source: str  # the data.yaml, VOC root, CVAT XML or Label Studio JSON the split was read from
    split: str | None
    image_root: Path  # COCO ``file_name`` is relative to it
    raw: dict[str, Any]
    locations: list[str]  # per annotation, what names it in the source (file:line or file: element)
    problems: list[Problem] = field(default_factory=list)  # FORMAT_PROBLEMS kinds
    first_error: str | None = None

    def __fspath__(self) -> str:
        return self.source

    def __str__(self) -> str:
        return self.name

    @property
    def name(self) -> str:
        return self.source if self.split is None else f"{self.source} [{self.split}]"

    def coco(self, *, max_examples: int = 5, warnings: bool = True) -> CocoFile:
        """The split validated by the COCO schema, with this reader's problems first and box problems
        located in the source files; :meth:`CocoFile.raise_if_fatal` names the first fatal one."""
        coco = validate_coco(self.raw, self.name, max_examples=max_examples, warnings=warnings)
        problems = [self._located(p, coco, max_examples) for p in coco.problems]
        return dataclasses.replace(
            coco, problems=self.problems + problems, first_error=self.first_error or coco.first_error
        )

    def _located(self, problem: Problem, coco: CocoFile, max_examples: int) -> Problem:
        status = _BOX_CODES.get(problem.code)
        if status is None:
            return problem
        table = coco.annotations
        rows = np.flatnonzero((table.status == status) & ~table.iscrowd)[:max_examples]
        sizes = {k: (r.width, r.height) for k, r in coco.images.items()}
        examples = []
        for row in rows.tolist():
            ann = self.raw["annotations"][int(table.entry_index[row])]
            w, h = sizes[int(table.image_ids[row])]
            box = ", ".join(f"{v:.6g}" for v in ann["bbox"])
            examples.append(
                f"{self.locations[int(table.entry_index[row])]}: bbox [{box}] vs image {w}x{h} (WxH)"
            )
        return dataclasses.replace(problem, examples=examples or problem.examples)


def new_log(source: str, max_examples: int) -> ProblemLog:
    return ProblemLog(FORMAT_PROBLEMS, max_examples, source)


def finish(log: ProblemLog, builder: CocoBuilder, *, fmt: str, source: str, split: str | None,
           image_root: Path) -> ForeignDataset:  # fmt: skip
    return ForeignDataset(
        fmt, source, split, image_root, builder.dataset(), builder.locations, log.problems(), log.first_fatal
    )


def parse_number(text: str | None) -> float | None:
    """A finite float from ``text``, else None (``nan``/``inf`` are refused)."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def image_root(annotation_file: Path, images: str | os.PathLike[str] | None) -> Path:
    """The image folder of a one-file dataset (CVAT XML, Label Studio JSON): ``images`` when given,
    else ``images/`` beside the file when it exists, else the file's folder."""
    if images is not None:
        return Path(images)
    beside = annotation_file.parent / "images"
    return beside if beside.is_dir() else annotation_file.parent


def relative_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` with forward slashes (absolute when it lies elsewhere)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def image_hw(path: Path) -> tuple[int, int] | None:
    """``(height, width)`` of the image as :func:`~atssdet.data.image_io.read_image` decodes it, from
    the header alone (Pillow opens lazily; EXIF orientations 5-8 swap the sides as OpenCV does)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "TIFF", "WEBP", "PNG") else 1
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return (height, width) if height > 0 and width > 0 else None


def parse_xml(path: Path, log: ProblemLog, where: str) -> Any | None:
    """The root element of the XML file ``path``, or None after logging why (file, line, column).

    Parsed with ``defusedxml`` (entity expansion such as "billion laughs" and external entities are
    refused) when it is installed, else with the standard library's parser, which refuses external
    entities but expands internal ones.
    """
    parse, errors = xml_parser()
    try:
        return parse(os.fspath(path)).getroot()
    except OSError as exc:
        log.add("unreadable_label_file", where, exc.strerror or str(exc))
    except errors as exc:
        position = getattr(exc, "position", None)
        at = f"line {position[0]}, column {position[1] + 1}: " if position else ""
        log.add("malformed_xml", where, f"{at}{exc}")
    return None


def xml_parser() -> tuple[Any, tuple[type[BaseException], ...]]:
    """(``parse`` function, exceptions meaning the XML is bad) of defusedxml, or the stdlib's."""
    import xml.etree.ElementTree as StdET

    try:
        import defusedxml
        import defusedxml.ElementTree as SafeET
    except ImportError:  # pragma: no cover - defusedxml is a dependency of the formats extra
        return StdET.parse, (StdET.ParseError,)
    return SafeET.parse, (StdET.ParseError, defusedxml.DefusedXmlException)


def iter_xml(path: Path) -> Any:
    """``iterparse(path, events=("start", "end"))`` of defusedxml (else the stdlib): a streaming parse."""
    try:
        import defusedxml.ElementTree as SafeET

        return SafeET.iterparse(os.fspath(path), events=("start", "end"))
    except ImportError:  # pragma: no cover
        import xml.etree.ElementTree as StdET

        return StdET.iterparse(os.fspath(path), events=("start", "end"))


def text_of(element: Any, tag: str) -> str | None:
    child = element.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def number_text(value: float) -> str:
    """``value`` written for a label file: exact for whole numbers, else 12 significant digits."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else f"{value:.12g}"


__all__ = ["FORMATS", "FORMAT_PROBLEMS", "CocoBuilder", "ForeignDataset", "short"]
