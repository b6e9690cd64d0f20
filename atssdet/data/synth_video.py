"""Short synthetic videos of moving, occluding shapes with MOT-format ground-truth tracks.

The shapes are :mod:`atssdet.data.synth`'s (same classes, same drawing code: ``_render_object`` in a
``cell x cell`` window, ``_object_fill``), on one of its textured backgrounds. Each object moves at a
constant velocity and bounces off the frame borders; objects are drawn in a fixed depth order, so
crossing paths occlude. Ground truth per frame and object: the tight box of the whole object, and
its visible fraction; an object less than :data:`MIN_VISIBILITY` visible gets no row in that frame.

Layout under ``out_dir`` (MOTChallenge's, readable by TrackEval and ``trackers.eval``)::

    <name>.mp4                 the video (MPEG-4 Part 2, ``fps``)
    <name>/gt/gt.txt           frame,id,x,y,w,h,1,1,visibility   (1-based frames and ids; class 1 = scored)
    <name>/seqinfo.ini         name, frame rate, length, size
    <name>/tracks.json         {track id: shape class name}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from atssdet.data.synth import _ALPHA_ON, SHAPE_CLASSES, _background, _object_fill, _render_object
from atssdet.fileio import atomic_path, atomic_write_text
from atssdet.guard import OutputGuard

COMMAND = "data synth"
MIN_VISIBILITY = 0.2


@dataclass(frozen=True)
class SynthVideo:
    video: Path
    gt_file: Path
    tracks_file: Path
    num_frames: int
    num_tracks: int


@dataclass
class _Sprite:
    label: int
    alpha: np.ndarray  # float32 [h, w, 1]
    fill: np.ndarray  # float32 [h, w, 3]
    box: tuple[int, int, int, int]  # tight box of the covered pixels inside the sprite
    pos: np.ndarray  # top-left, float [x, y]
    vel: np.ndarray  # pixels per frame [vx, vy]


def _sprites(
    rng: np.random.Generator, h: int, w: int, count: int, cell: int, image: np.ndarray
) -> list[_Sprite]:
    out: list[_Sprite] = []
    while len(out) < count:
        label = int(rng.integers(len(SHAPE_CLASSES)))
        rendered = _render_object(rng, label, cell, cell)
        if rendered is None:
            continue
        mask, _ = rendered
        covered = mask >= _ALPHA_ON
        if covered.sum() < 40:
            continue
        ys, xs = np.nonzero(covered)
        sh, sw = mask.shape
        pos = np.array([rng.uniform(0, w - sw), rng.uniform(0, h - sh)])
        speed, angle = rng.uniform(1.5, 4.0), rng.uniform(0, 2 * np.pi)
        fill = _object_fill(rng, sh, sw, image.reshape(-1, 3).mean(axis=0))
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        vel = speed * np.array([np.cos(angle), np.sin(angle)])
        out.append(_Sprite(label, mask.astype(np.float32)[..., None] / 255.0, fill, box, pos, vel))
    return out


def render_video(
    rng: np.random.Generator,
    num_frames: int,
    height: int,
    width: int,
    *,
    num_objects: int = 5,
    cell: int = 72,
) -> tuple[list[np.ndarray], list[tuple[int, int, float, float, float, float, float]], list[int]]:
    """Frames (BGR uint8), ground-truth rows ``(frame, id, x, y, w, h, visibility)`` (1-based) and the
    shape label of each track id (``labels[id - 1]``)."""
    background = _background(rng, height, width)
    sprites = _sprites(rng, height, width, num_objects, cell, background)
    frames, rows = [], []
    for f in range(num_frames):
        image = background.copy()
        owner = np.full((height, width), -1, dtype=np.int32)
        for k, s in enumerate(sprites):  # depth order: later sprites cover earlier ones
            sh, sw = s.alpha.shape[:2]
            x, y = int(round(s.pos[0])), int(round(s.pos[1]))
            window = image[y : y + sh, x : x + sw]
            window[:] = window * (1 - s.alpha) + s.fill * s.alpha
            owner[y : y + sh, x : x + sw][s.alpha[..., 0] >= _ALPHA_ON / 255.0] = k
        visible = np.bincount(owner[owner >= 0].ravel(), minlength=len(sprites))
        for k, s in enumerate(sprites):
            full = float((s.alpha >= _ALPHA_ON / 255.0).sum())
            vis = visible[k] / full
            if vis >= MIN_VISIBILITY:
                x, y = int(round(s.pos[0])), int(round(s.pos[1]))
                x1, y1, x2, y2 = s.box
                rows.append(
                    (
                        f + 1,
                        k + 1,
                        float(x + x1),
                        float(y + y1),
                        float(x2 - x1),
                        float(y2 - y1),
                        round(vis, 3),
                    )
                )
            _move(s, height, width)
        frames.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
    return frames, rows, [s.label for s in sprites]


def _move(s: _Sprite, h: int, w: int) -> None:
    """One step of constant velocity, bouncing off the borders (the sprite stays inside the frame)."""
    sh, sw = s.alpha.shape[:2]
    s.pos += s.vel
    for axis, limit in ((0, w - sw), (1, h - sh)):
        if s.pos[axis] < 0 or s.pos[axis] > limit:
            s.vel[axis] = -s.vel[axis]
            s.pos[axis] = float(np.clip(s.pos[axis], 0, limit))


def generate_video(
    out_dir: str | os.PathLike[str],
    *,
    name: str = "shapes",
    seed: int = 0,
    num_frames: int = 60,
    size: tuple[int, int] = (240, 320),
    num_objects: int = 5,
    fps: float = 15.0,
    overwrite: bool = False,
) -> SynthVideo:
    """Write ``<name>.mp4`` and its MOT ground truth into ``out_dir`` (see the module docstring).

    Files of these names that ``data synth`` did not write are refused unless ``overwrite``.
    """
    height, width = size
    if num_frames < 1 or num_objects < 1 or min(height, width) < 96:
        raise ValueError(
            f"need num_frames, num_objects >= 1 and sides >= 96, got {num_frames}, {num_objects}, {size}"
        )
    root = Path(out_dir)
    seq = root / name
    video, gt_file, tracks_file, info = (
        root / f"{name}.mp4",
        seq / "gt" / "gt.txt",
        seq / "tracks.json",
        seq / "seqinfo.ini",
    )
    OutputGuard(COMMAND, overwrite=overwrite).check([video, gt_file, tracks_file, info])
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    frames, rows, labels = render_video(rng, num_frames, height, width, num_objects=num_objects)
    gt_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(video, suffix=".mp4", mark=COMMAND) as tmp:
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter.fourcc(*"mp4v"), fps, (width, height))
        if not writer.isOpened():
            raise ValueError(f"{video}: OpenCV cannot write MPEG-4 video here")
        for frame in frames:
            writer.write(frame)
        writer.release()
    text = "".join(f"{f},{i},{x:.1f},{y:.1f},{w:.1f},{h:.1f},1,1,{v}\n" for f, i, x, y, w, h, v in rows)
    atomic_write_text(gt_file, text, mark=COMMAND)
    tracks = {str(i + 1): SHAPE_CLASSES[lab] for i, lab in enumerate(labels)}
    atomic_write_text(tracks_file, json.dumps(tracks, indent=1) + "\n", mark=COMMAND)
    atomic_write_text(
        info,
        f"[Sequence]\nname={name}\nimDir=img1\nframeRate={fps:g}\nseqLength={num_frames}\n"
        f"imWidth={width}\nimHeight={height}\nimExt=.png\n",
        mark=COMMAND,
    )
    return SynthVideo(video, gt_file, tracks_file, num_frames, len(labels))
