"""Large images with small shapes (a COCO val split), for sliced inference (:mod:`atssdet.slicing`).

Each image is :mod:`atssdet.data.synth`'s textured background at e.g. 960x960 with many objects of
12 to ``cell / 2`` pixels, the same six shape classes drawn by the same code (``_render_object`` in a
``cell x cell`` window, pasted at a random free grid cell, so objects never overlap). Resized whole to
a detector's test size they shrink below what it can see; tiles of the training scale keep them.

Layout under ``out_dir`` (readable by ``atssdet eval --data``)::

    annotations/instances_val.json    val/val_000001.png ...
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from atssdet.data.synth import (
    _ALPHA_ON,
    SHAPE_CLASSES,
    _background,
    _draw_clutter,
    _object_fill,
    _render_object,
    coco_annotations,
)
from atssdet.fileio import atomic_write_bytes
from atssdet.guard import OutputGuard

COMMAND = "data synth"  # the written-by mark, as synth.py's files


@dataclass(frozen=True)
class SmallObjectsSet:
    root: Path
    ann_file: Path
    images: Path
    num_boxes: int


def render_small_objects_image(
    rng: np.random.Generator, height: int, width: int, *, cell: int = 80, fill: float = 0.3
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """BGR uint8 ``[height, width, 3]`` and its objects (``label``, ``bbox_xyxy``, ``area``), as
    :func:`atssdet.data.synth.render_image` returns them; about ``fill`` of the grid cells hold one."""
    image = _background(rng, height, width)
    _draw_clutter(rng, image, int(rng.integers(4, 12)), None, thin=False)
    rows, cols = height // cell, width // cell
    chosen = np.flatnonzero(rng.random(rows * cols) < fill)
    objects: list[dict[str, Any]] = []
    for k in chosen.tolist():  # one object per chosen cell (rendering, not a hot path)
        label = int(rng.integers(len(SHAPE_CLASSES)))
        rendered = _render_object(rng, label, cell, cell)
        if rendered is None:
            continue
        mask, (x0, y0, x1, y1) = rendered
        covered = mask >= _ALPHA_ON
        if covered.sum() < 16:
            continue
        ox, oy = (k % cols) * cell + x0, (k // cols) * cell + y0
        window = image[oy : oy + (y1 - y0), ox : ox + (x1 - x0)]
        fill_px = _object_fill(rng, y1 - y0, x1 - x0, window[covered].mean(axis=0))
        alpha = mask.astype(np.float32)[..., None] / 255.0
        window[:] = window * (1 - alpha) + fill_px * alpha
        ys, xs = np.nonzero(covered)
        box = (ox + int(xs.min()), oy + int(ys.min()), ox + int(xs.max()) + 1, oy + int(ys.max()) + 1)
        objects.append({"label": label, "bbox_xyxy": box, "area": int(covered.sum())})
    if rng.random() < 0.5:
        image += rng.normal(0, rng.uniform(1, 5), size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def generate_small_objects(
    out_dir: str | os.PathLike[str],
    *,
    num_images: int,
    seed: int = 0,
    size: tuple[int, int] = (960, 960),
    cell: int = 80,
    overwrite: bool = False,
) -> SmallObjectsSet:
    """Write ``num_images`` images of ``size`` = (height, width) and their COCO annotations.

    Files of these names that ``data synth`` did not write are refused unless ``overwrite``
    (:class:`~atssdet.guard.OutputGuard`); every file is written atomically.
    """
    height, width = size
    if num_images < 1 or min(height, width) < cell:
        raise ValueError(f"need num_images >= 1 and an image side >= cell {cell}, got {num_images}, {size}")
    root = Path(out_dir)
    ann_file, image_dir = root / "annotations" / "instances_val.json", root / "val"
    names = [f"val_{i + 1:06d}.png" for i in range(num_images)]
    OutputGuard(COMMAND, overwrite=overwrite).check([ann_file, *(image_dir / n for n in names)])
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 7, i]))
        image, objects = render_small_objects_image(rng, height, width, cell=cell)
        ok, encoded = cv2.imencode(".png", image)
        assert ok
        atomic_write_bytes(image_dir / name, encoded.tobytes(), mark=COMMAND)
        images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
        annotations += coco_annotations(objects, image_id=i + 1, first_id=len(annotations) + 1)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    coco = {
        "info": {"description": "atssdet small shapes in large images"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_bytes(ann_file, json.dumps(coco, separators=(",", ":")).encode(), mark=COMMAND)
    return SmallObjectsSet(root, ann_file, image_dir, len(annotations))
