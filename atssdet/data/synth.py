"""Synthetic COCO-format detection dataset: coloured shapes on textured backgrounds.

Six classes (:data:`SHAPE_CLASSES`) with sizes from ~12 px to half the short image side, random
aspect, rotation and colour, partial occlusion between objects, and unlabeled clutter (lines,
scribbles, dots) on noise / gradient / stripe backgrounds. Every image is rendered from its own
generator ``SeedSequence([seed, split, index])``, so the same seed gives byte-identical files.

Boxes are tight pixel boxes (``x2 = last covered column + 1``) around the *whole* object (covered =
rasterised alpha >= 0.5), as COCO keeps the full-object box of an occluded object; an object more
than :data:`MAX_HIDDEN_FRACTION` hidden (by later objects or foreground clutter) gets no annotation.
``area`` is the visible pixel count.

Layout written under ``out_dir`` (readable by :func:`atssdet.data.coco.find_coco_split`)::

    annotations/instances_train.json   annotations/instances_val.json
    train/train_000001.png ...         val/val_000001.png ...   (or .jpg)
    synth_manifest.json                (parameters; written last, marks the dataset complete)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# One definition of the class names, shared with the demo presets in atssdet.config.
from atssdet.config import SHAPE_CLASSES as SHAPE_CLASSES
from atssdet.fileio import atomic_write_bytes
from atssdet.guard import OutputGuard

GENERATOR_VERSION = 1
MANIFEST_NAME = "synth_manifest.json"
COMMAND = "data synth"  # the written-by mark of its files
MAX_HIDDEN_FRACTION = 0.7
MIN_OBJECT_SIZE = 12
SPLITS = ("train", "val")

_SHIFT = 4  # cv2.fillPoly sub-pixel bits
_ALPHA_ON = 128  # alpha >= 0.5 counts as covered


@dataclass(frozen=True)
class SynthParams:
    """Everything that determines the generated files."""

    seed: int
    num_train: int
    num_val: int
    image_size_min: int
    image_size_max: int
    image_format: str = "png"
    version: int = GENERATOR_VERSION


@dataclass(frozen=True)
class SynthDataset:
    """Where a generated dataset lives; ``skipped`` is True when an identical one already existed."""

    root: Path
    train_ann: Path
    train_images: Path
    val_ann: Path
    val_images: Path
    class_names: tuple[str, ...]
    skipped: bool


# ------------------------------------------------------------------------------------------------
# Shapes: polygons in unit coordinates (radius ~1, centred at 0); a shape is (outer, hole or None).
# ------------------------------------------------------------------------------------------------


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _shape_polygons(name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    if name == "circle":
        return _regular(64), None
    if name == "rectangle":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64), None
    if name == "triangle":
        return _regular(3), None
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = _regular(10)
        pts[1::2] *= inner
        return pts, None
    if name == "ring":
        return _regular(64), _regular(64, radius=rng.uniform(0.45, 0.62))
    if name == "cross":
        a = rng.uniform(0.3, 0.42)
        corners = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]  # fmt: skip
        return np.array(corners, dtype=np.float64), None
    raise ValueError(f"unknown shape {name!r}")


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.integers(0, 180), rng.integers(60, 256), rng.integers(70, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Float32 [h, w, 3] BGR: a linear gradient between two colours plus stripes or smooth noise."""
    c0, c1 = _random_colour(rng) * 0.8, _random_colour(rng) * 0.8
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    proj = xx * math.cos(angle) + yy * math.sin(angle)
    t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1.0)
    image = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes
        s_angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        amp = rng.uniform(15, 50)
        phase = (xx * math.cos(s_angle) + yy * math.sin(s_angle)) * (2 * math.pi / period)
        image += (amp * np.sin(phase))[..., None]
    elif kind == 1:  # smooth colour noise
        gh, gw = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        grid = rng.normal(0, rng.uniform(20, 50), size=(gh, gw, 3)).astype(np.float32)
        image += cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    # kind == 2: gradient only
    return image


def _polyline_points(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    n = int(rng.integers(2, 6))
    start = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    steps = rng.normal(0, min(h, w) / 5, size=(n - 1, 2))
    return np.vstack([start, start + np.cumsum(steps, axis=0)])


def _draw_clutter(
    rng: np.random.Generator, image: np.ndarray, count: int, owner: np.ndarray | None, *, thin: bool
) -> None:
    """Unlabeled distractors: polylines and small dots; marks covered pixels in ``owner`` as -2."""
    h, w = image.shape[:2]
    for _ in range(count):
        mask = np.zeros((h, w), dtype=np.uint8)
        if rng.random() < 0.7:
            pts = np.round(_polyline_points(rng, h, w) * (1 << _SHIFT)).astype(np.int32)
            thickness = int(rng.integers(1, 3 if thin else 4))
            cv2.polylines(mask, [pts], False, 255, thickness, cv2.LINE_AA, _SHIFT)
        else:
            centre = (int(rng.uniform(0, w) * (1 << _SHIFT)), int(rng.uniform(0, h) * (1 << _SHIFT)))
            cv2.circle(mask, centre, int(rng.uniform(1.5, 4.0) * (1 << _SHIFT)), 255, -1, cv2.LINE_AA, _SHIFT)
        alpha = mask.astype(np.float32)[..., None] / 255.0
        image[:] = image * (1 - alpha) + _random_colour(rng) * alpha
        if owner is not None:
            owner[mask >= _ALPHA_ON] = -2


@dataclass
class _Object:
    label: int
    x1: int
    y1: int
    x2: int
    y2: int
    full_pixels: int


def _render_object(
    rng: np.random.Generator, label: int, h: int, w: int
) -> tuple[np.ndarray, tuple[int, int, int, int]] | None:
    """Alpha mask (uint8, window-sized) and its window (x0, y0, x1, y1) of one random object, or None."""
    outer, hole = _shape_polygons(SHAPE_CLASSES[label], rng)
    max_size = min(h, w) / 2
    size = math.exp(rng.uniform(math.log(MIN_OBJECT_SIZE), math.log(max_size)))
    aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
    theta = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    scale = np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])

    def place(poly: np.ndarray) -> np.ndarray:
        return (poly * scale) @ rot.T

    outer_p = place(outer)
    extent = outer_p.max(axis=0) - outer_p.min(axis=0)
    outer_p *= size / float(extent.max())  # longer side of the object = size
    lo, hi = outer_p.min(axis=0), outer_p.max(axis=0)
    if hi[0] - lo[0] > w - 2 or hi[1] - lo[1] > h - 2:
        return None
    cx = rng.uniform(1 - lo[0], w - 1 - hi[0])
    cy = rng.uniform(1 - lo[1], h - 1 - hi[1])
    centre = np.array([cx, cy])
    x0, y0 = int(math.floor(cx + lo[0])) - 1, int(math.floor(cy + lo[1])) - 1
    x1, y1 = int(math.ceil(cx + hi[0])) + 1, int(math.ceil(cy + hi[1])) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    offset = np.array([x0, y0]) + 0.5  # cv2 puts pixel centres at integer coordinates
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)

    def to_cv(poly: np.ndarray) -> np.ndarray:
        return np.round((poly + centre - offset) * (1 << _SHIFT)).astype(np.int32)

    cv2.fillPoly(mask, [to_cv(outer_p)], 255, cv2.LINE_AA, _SHIFT)
    if hole is not None:
        hole_p = place(hole) * (size / float(extent.max()))
        cv2.fillPoly(mask, [to_cv(hole_p)], 0, cv2.LINE_AA, _SHIFT)
    return mask, (x0, y0, x1, y1)


def _object_fill(rng: np.random.Generator, hh: int, ww: int, avoid: np.ndarray) -> np.ndarray:
    """Float32 [hh, ww, 3] fill: a solid colour far from ``avoid`` (the local background), maybe shaded."""
    colour = _random_colour(rng)
    for _ in range(20):
        if float(np.abs(colour - avoid).sum()) >= 150:
            break
        colour = _random_colour(rng)
    else:
        colour = 255.0 - avoid
    fill = np.broadcast_to(colour, (hh, ww, 3)).astype(np.float32)
    if rng.random() < 0.35:  # shading across the object
        t = np.linspace(-1, 1, ww, dtype=np.float32)[None, :, None]
        fill = np.clip(fill * (1 + 0.25 * t), 0, 255)
    return fill


def render_image(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One synthetic image (BGR uint8 [height, width, 3]) and its objects.

    Objects: dicts with ``label`` (0..5), ``bbox_xyxy`` (ints, tight, full object) and ``area``
    (visible pixels); objects more than :data:`MAX_HIDDEN_FRACTION` hidden are left out.
    """
    h, w = height, width
    image = _background(rng, h, w)
    _draw_clutter(rng, image, int(rng.integers(2, 8)), None, thin=False)
    owner = np.full((h, w), -1, dtype=np.int32)
    objects: list[_Object] = []
    visible: list[int] = []
    num_objects = int(rng.integers(1, 9))
    for _ in range(num_objects):
        label = int(rng.integers(len(SHAPE_CLASSES)))
        for _attempt in range(10):
            rendered = _render_object(rng, label, h, w)
            if rendered is None:
                continue
            mask, (x0, y0, x1, y1) = rendered
            covered = mask >= _ALPHA_ON
            full = int(covered.sum())
            if full < 16:
                continue
            # Partial occlusion is welcome, but no earlier object may end up more than half hidden.
            under = owner[y0:y1, x0:x1][covered]
            lost = np.bincount(under[under >= 0], minlength=len(objects))
            if any(visible[k] - lost[k] < 0.5 * objects[k].full_pixels for k in range(len(objects))):
                continue
            ys, xs = np.nonzero(covered)
            k = len(objects)
            for j in range(len(objects)):
                visible[j] -= int(lost[j])
            objects.append(
                _Object(
                    label,
                    x0 + int(xs.min()),
                    y0 + int(ys.min()),
                    x0 + int(xs.max()) + 1,
                    y0 + int(ys.max()) + 1,
                    full,
                )
            )
            visible.append(full)
            avoid = image[y0:y1, x0:x1][covered].mean(axis=0)
            fill = _object_fill(rng, y1 - y0, x1 - x0, avoid)
            alpha = mask.astype(np.float32)[..., None] / 255.0
            window = image[y0:y1, x0:x1]
            window[:] = window * (1 - alpha) + fill * alpha
            owner[y0:y1, x0:x1][covered] = k
            break
    _draw_clutter(rng, image, int(rng.integers(0, 3)), owner, thin=True)
    # Sensor-like pixel noise on half the images only: it is incompressible and would make the PNGs 3x larger.
    if rng.random() < 0.5:
        image += rng.normal(0, rng.uniform(1, 5), size=image.shape).astype(np.float32)
    out = np.clip(np.round(image), 0, 255).astype(np.uint8)
    counts = np.bincount(owner[owner >= 0].ravel(), minlength=len(objects))
    annotations = [
        {"label": o.label, "bbox_xyxy": (o.x1, o.y1, o.x2, o.y2), "area": int(counts[k])}
        for k, o in enumerate(objects)
        if counts[k] >= (1 - MAX_HIDDEN_FRACTION) * o.full_pixels
    ]
    return out, annotations


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def coco_annotations(objects: list[dict[str, Any]], *, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """COCO annotations (ids from ``first_id``, 1-based categories) of rendered ``objects``."""
    out = []
    for k, obj in enumerate(objects):
        x1, y1, x2, y2 = obj["bbox_xyxy"]
        out.append({"id": first_id + k, "image_id": image_id, "category_id": obj["label"] + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": obj["area"], "iscrowd": 0})  # fmt: skip
    return out


def _image_name(split: str, index: int, image_format: str) -> str:
    return f"{split}_{index + 1:06d}.{image_format}"


def _paths(root: Path) -> dict[str, Path]:
    return {
        "train_ann": root / "annotations" / "instances_train.json",
        "train_images": root / "train",
        "val_ann": root / "annotations" / "instances_val.json",
        "val_images": root / "val",
    }


def _recorded_params(manifest: Path) -> Any:
    try:
        return json.loads(manifest.read_text()).get("params")
    except (OSError, ValueError, AttributeError):
        return None


def _is_complete(root: Path, params: SynthParams) -> bool:
    if _recorded_params(root / MANIFEST_NAME) != asdict(params):
        return False
    paths = _paths(root)
    for split, count in (("train", params.num_train), ("val", params.num_val)):
        if not paths[f"{split}_ann"].is_file():
            return False
        if not all(
            (paths[f"{split}_images"] / _image_name(split, i, params.image_format)).is_file()
            for i in range(count)
        ):
            return False
    return True


def generate_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int,
    num_val: int,
    seed: int = 0,
    image_size: tuple[int, int] = (256, 384),
    image_format: str = "png",
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    overwrite: bool = False,
) -> SynthDataset:
    """Write the synthetic dataset to ``out_dir`` (or reuse it when complete with the same parameters).

    ``image_size`` = (min, max) side in pixels; each image draws its height and width from it.
    ``image_format``: "png" (lossless, default) or "jpg" (quality 95, about 4x smaller files).
    Existing files of another parameter set are replaced only with ``force=True``; files of these
    names that ``data synth`` did not write only with ``overwrite=True`` (:mod:`atssdet.guard`).
    """
    lo, hi = image_size
    if num_train < 0 or num_val < 0:
        raise ValueError(f"--num-train/--num-val must be >= 0, got {num_train}, {num_val}")
    if not 2 * MIN_OBJECT_SIZE + 8 <= lo <= hi:
        raise ValueError(
            f"image size range must satisfy {2 * MIN_OBJECT_SIZE + 8} <= min <= max, got {lo}, {hi}"
        )
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image format must be 'png' or 'jpg', got {image_format!r}")
    root = Path(out_dir)
    params = SynthParams(seed, num_train, num_val, lo, hi, image_format)
    paths = _paths(root)
    result = SynthDataset(root=root, class_names=SHAPE_CLASSES, skipped=False, **paths)
    if _is_complete(root, params):
        log(f"{root}: complete synthetic dataset with the same parameters already there; skipping generation")
        return SynthDataset(root=root, class_names=SHAPE_CLASSES, skipped=True, **paths)
    manifest = root / MANIFEST_NAME
    if manifest.exists() and _recorded_params(manifest) != asdict(params) and not force:
        raise ValueError(
            f"{root} holds a synthetic dataset with other parameters ({manifest}); "
            "choose another --out or pass --force to regenerate it"
        )
    guard = OutputGuard(COMMAND, overwrite=overwrite)
    guard.check([manifest, *(paths[f"{sp}_ann"] for sp in ("train", "val"))] + [
        paths[f"{sp}_images"] / _image_name(sp, i, image_format)
        for sp, count in (("train", num_train), ("val", num_val)) for i in range(count)
    ])  # fmt: skip
    manifest.unlink(missing_ok=True)

    from tqdm import tqdm

    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)]
    for split_id, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        image_dir = paths[f"{split}_images"]
        image_dir.mkdir(parents=True, exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for i in tqdm(range(count), desc=f"synth {split}", unit="img", disable=not progress):
            rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, i]))
            height = int(rng.integers(lo, hi + 1))
            width = int(rng.integers(lo, hi + 1))
            image, objects = render_image(rng, height, width)
            name = _image_name(split, i, image_format)
            encode_params = [cv2.IMWRITE_JPEG_QUALITY, 95] if image_format == "jpg" else []
            ok, encoded = cv2.imencode(f".{image_format}", image, encode_params)
            if not ok:  # pragma: no cover - OpenCV always encodes uint8 BGR
                raise RuntimeError(f"cannot encode {name}")
            atomic_write_bytes(image_dir / name, encoded.tobytes(), mark=COMMAND)
            images.append({"id": i + 1, "file_name": name, "height": height, "width": width})
            annotations += coco_annotations(objects, image_id=i + 1, first_id=len(annotations) + 1)
        keep = {_image_name(split, i, image_format) for i in range(count)}
        for stale in image_dir.iterdir():  # leftovers of a larger earlier run (never the user's files)
            if re.fullmatch(rf"{split}_\d{{6}}\.(png|jpg)", stale.name) and stale.name not in keep:
                if guard.may_delete(stale):
                    stale.unlink()
        coco = {
            "info": {"description": f"atssdet synthetic shapes ({split})", "version": str(GENERATOR_VERSION)},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        atomic_write_bytes(
            paths[f"{split}_ann"], json.dumps(coco, separators=(",", ":")).encode(), mark=COMMAND
        )
        log(f"wrote {count} {split} images, {len(annotations)} boxes -> {paths[f'{split}_ann']}")
    record = {"generator": "atssdet.data.synth", "params": asdict(params), "class_names": list(SHAPE_CLASSES)}
    atomic_write_bytes(manifest, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), mark=COMMAND)
    return result
