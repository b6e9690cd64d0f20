"""``predict --save-format yolo|voc``: one label file per image, in the layout each format's tools read.

``yolo``: ``OUT/labels/<name>.txt`` (class, normalised centre box, score: Ultralytics' ``save_conf``
layout) plus ``OUT/classes.txt``; ``voc``: ``OUT/Annotations/<name>.xml`` (1-based inclusive pixels, a
``<score>`` per object). ``<name>`` is the drawn image's name without its suffix, so two ``cat.jpg`` from
different folders give ``cat`` and ``cat_2``. The writers are :mod:`atssdet.data.formats`' own (the
same conventions as ``data convert``); every write is atomic through :mod:`atssdet.fileio`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from atssdet.errors import OptionError
from atssdet.structures import Detections

SAVE_FORMATS = ("yolo", "voc")
_LAYOUT = {"yolo": ("labels", ".txt"), "voc": ("Annotations", ".xml")}


def label_paths(out: Path, names: Sequence[str], save_format: str | None) -> list[Path]:
    """The label file of each output name (``[]`` without a ``save_format``), and the class list."""
    if save_format is None:
        return []
    if save_format not in SAVE_FORMATS:
        raise OptionError(f"save_format: {save_format!r} is not one of {', '.join(SAVE_FORMATS)}")
    folder, suffix = _LAYOUT[save_format]
    paths = [out / folder / (Path(n).stem + suffix) for n in names]
    return paths + ([out / "classes.txt"] if save_format == "yolo" else [])


def write_class_list(path: Path, class_names: Sequence[str], *, mark: str) -> None:
    from atssdet.fileio import atomic_write_text

    atomic_write_text(path, "".join(f"{n}\n" for n in class_names), mark=mark)


def write_labels(result: Detections, path: Path, save_format: str, *, file_name: str, mark: str) -> None:
    """Write ``result`` (a readable image's detections, ``image_hw`` set) as ``path`` in ``save_format``."""
    assert result.image_hw is not None, "a label file needs the image size"
    path.parent.mkdir(parents=True, exist_ok=True)
    if save_format == "yolo":
        from atssdet.data.formats.yolo import write_yolo_labels

        write_yolo_labels(result, result.image_hw, path, mark=mark)
    else:
        from atssdet.data.formats.voc import write_voc_xml

        write_voc_xml(
            result, result.image_hw, path, class_names=result.class_names, file_name=file_name, mark=mark
        )
