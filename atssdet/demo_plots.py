"""Pictures of the offline demo (:mod:`atssdet.demo`): the loss / mAP plot, enlarged drawn detections,
a grid of them; images are written atomically through :mod:`atssdet.fileio`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from atssdet.criterion import LOSS_KEYS
from atssdet.fileio import atomic_path, atomic_write_bytes

COMMAND = "demo"  # the written-by mark of the demo's files (atssdet.guard)


def write_image(path: Path, image: np.ndarray) -> Path:
    """Encode BGR uint8 ``image`` by the suffix of ``path`` and write it atomically."""
    ok, buf = cv2.imencode(path.suffix, image)
    if not ok:
        raise ValueError(f"{path}: cv2 cannot encode an image as {path.suffix!r}")
    atomic_write_bytes(path, buf.tobytes(), mark=COMMAND)
    return path


def plot_history(history: dict[str, Any], path: Path, *, title: str) -> Path:
    """Training losses (per iteration, with a moving average) and val mAP over iterations, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    iters = np.asarray(history["iteration"], dtype=np.float64)
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    window = max(1, min(25, len(iters) // 10))
    kernel = np.ones(window) / window
    for key, colour in zip(LOSS_KEYS, ("black", "tab:blue", "tab:orange", "tab:green"), strict=True):
        values = np.asarray(history[key], dtype=np.float64)
        if len(values) == 0:
            continue
        ax_loss.plot(iters, values, color=colour, alpha=0.2, linewidth=0.7)
        if len(values) >= window:
            smooth = np.convolve(values, kernel, mode="valid")
            ax_loss.plot(iters[window - 1 :], smooth, color=colour, linewidth=1.6, label=key)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"training loss (moving average of {window})")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")

    evals = history.get("evals", [])
    if evals:
        e_iters = [e["iteration"] for e in evals]
        for key, label, style in (
            ("AP", "mAP@[.5:.95]", "o-"),
            ("AP50", "AP50", "s--"),
            ("AP75", "AP75", "^:"),
        ):
            ax_ap.plot(e_iters, [100 * e["stats"][key] for e in evals], style, label=label)
        last = evals[-1]
        ax_ap.annotate(
            f"{100 * last['stats']['AP']:.1f}",
            (last["iteration"], 100 * last["stats"]["AP"]),
            textcoords="offset points",
            xytext=(-6, 8),
            ha="right",
        )
    ax_ap.axhline(50, color="grey", linewidth=0.8, linestyle="--", label="mAP 50 (demo target)")
    ax_ap.set_ylim(0, 100)
    ax_ap.set_xlim(0, max(iters[-1] if len(iters) else 1, 1))
    ax_ap.set_xlabel("iteration")
    ax_ap.set_ylabel("AP (%)")
    ax_ap.set_title("val COCO AP")
    ax_ap.grid(alpha=0.3)
    ax_ap.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".png", mark=COMMAND) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path


def make_grid(images: Sequence[np.ndarray], *, columns: int = 4, pad: int = 4) -> np.ndarray:
    """Tile BGR uint8 images (any sizes) into one image, row by row, on a white background."""
    if not images:
        return np.full((8, 8, 3), 255, dtype=np.uint8)
    rows = [images[i : i + columns] for i in range(0, len(images), columns)]
    cell_h = max(im.shape[0] for im in images)
    cell_w = max(im.shape[1] for im in images)
    ncols = min(columns, len(images))
    grid = np.full((len(rows) * (cell_h + pad) + pad, ncols * (cell_w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
            grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid


def draw_enlarged(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    *,
    min_side: int = 384,
) -> np.ndarray:
    """:func:`atssdet.visualize.draw_detections` on a copy of ``image`` enlarged for readable captions.

    The image (BGR uint8) is enlarged by an integer factor (nearest neighbour, pixels stay crisp) so
    that its short side is at least ``min_side``; ``boxes`` [K, 4] xyxy are scaled alike.
    """
    from atssdet.visualize import draw_detections

    scale = max(1, math.ceil(min_side / max(1, min(image.shape[:2]))))
    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST) if scale > 1 else image
    boxes_big = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    return draw_detections(big, boxes_big, scores, labels, class_names, thickness=2)
