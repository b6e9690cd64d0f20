"""``eval --analysis DIR``: precision-recall curves, the confusion matrix and the TIDE breakdown as files.

:func:`analyse` computes everything (:class:`Analysis`); :func:`write_analysis` writes, through
:mod:`atssdet.fileio` after the output guard:

* ``pr_curves/<k>_<class>.png`` (one per class) and ``pr_curves.png`` (all classes in a grid):
  COCOeval's interpolated precision at the 101 recall points, IoU 0.5 and 0.75, all areas, 100 dets;
* ``confusion_matrix.png`` and ``confusion_matrix.csv`` (:func:`~.analysis.confusion_matrix`);
* ``tide.png`` and ``analysis.json`` (TIDE's dAP and counts, the matrix, the per-class AP50).

Plots are drawn with matplotlib's object API (``Figure``, Agg canvas: no display, no global state).
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atssdet.data.coco_records import CocoFile
from atssdet.evaluation.analysis import ERROR_TYPES, TideReport, confusion_matrix, tide_errors
from atssdet.evaluation.coco import run_cocoeval
from atssdet.evaluation.report import COMMAND
from atssdet.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from atssdet.guard import OutputGuard
from atssdet.visualize import DRAW_SCORE_THRESHOLD

FIXED_FILES = ("pr_curves.png", "confusion_matrix.png", "confusion_matrix.csv", "tide.png", "analysis.json")


@dataclass
class Analysis:
    class_names: list[str]  # category-id order
    recall: np.ndarray  # float [101]
    precision: np.ndarray  # float [2, 101, C]: IoU 0.5 and 0.75; -1 where a class has no ground truth
    ap50: dict[str, float]
    confusion: np.ndarray  # int64 [C + 1, C + 1]
    tide: TideReport
    score_threshold: float


def analyse(
    gt: CocoFile, results: Sequence[dict[str, Any]], *, score_threshold: float = DRAW_SCORE_THRESHOLD
) -> Analysis:
    """PR curves (COCOeval), the confusion matrix at IoU 0.5 and the TIDE breakdown of ``results``."""
    names = [gt.categories[k] for k in sorted(gt.categories)]
    coco_eval = run_cocoeval(gt, list(results))
    precision = np.asarray(coco_eval.eval["precision"])[[0, 5], :, :, 0, -1]  # [2, R, K]
    ap50 = {}
    for k, name in enumerate(names):
        p = precision[0, :, k]
        ap50[name] = float(p.mean()) if (p > -1).all() else float("nan")
    return Analysis(
        class_names=names,
        recall=np.asarray(coco_eval.params.recThrs),
        precision=precision,
        ap50=ap50,
        confusion=confusion_matrix(gt, results, score_threshold=score_threshold),
        tide=tide_errors(gt, results),
        score_threshold=score_threshold,
    )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")[:60] or "class"


def pr_curve_name(k: int, name: str) -> str:
    return f"pr_curves/{k:03d}_{_safe(name)}.png"


def planned_files(class_names: Sequence[str]) -> list[str]:
    """Every file :func:`write_analysis` writes, relative to its folder."""
    return [*FIXED_FILES, *(pr_curve_name(k, n) for k, n in enumerate(class_names))]


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _axes_pr(ax: Any, a: Analysis, k: int) -> None:
    for t, (label, style) in enumerate((("IoU 0.5", "-"), ("IoU 0.75", "--"))):
        p = a.precision[t, :, k]
        if (p > -1).all():
            ax.plot(a.recall, p, style, label=f"{label}: AP {100 * p.mean():.1f}")
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=a.class_names[k])
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no ground truth", ha="center", va="center")


def pr_curve_png(a: Analysis, k: int) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3.4))
    _axes_pr(fig.add_subplot(), a, k)
    return _png(fig)


def pr_grid_png(a: Analysis) -> bytes:
    from matplotlib.figure import Figure

    n = len(a.class_names)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(3.2 * cols, 2.8 * rows))
    for k in range(n):
        _axes_pr(fig.add_subplot(rows, cols, k + 1), a, k)
    fig.tight_layout()
    return _png(fig)


def confusion_png(a: Analysis) -> bytes:
    from matplotlib.figure import Figure

    labels = [*a.class_names, "background"]
    m = a.confusion
    side = max(4.0, 0.45 * len(labels) + 2)
    fig = Figure(figsize=(side, side * 0.85))
    ax = fig.add_subplot()
    ax.imshow(np.log1p(m), cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
    ax.set_yticks(range(len(labels)), labels, fontsize="small")
    ax.set(xlabel="predicted", ylabel="true", title=f"confusion at IoU 0.5, score >= {a.score_threshold:g}")
    if len(labels) <= 30:
        for (i, j), v in np.ndenumerate(m):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize="x-small",
                        color="white" if v > m.max() / 2 else "black")  # fmt: skip
    return _png(fig)


def tide_png(a: Analysis) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3))
    ax = fig.add_subplot()
    values = [a.tide.delta_ap[k] for k in ERROR_TYPES]
    ax.bar(ERROR_TYPES, values, color=["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#7f7f7f", "#1f77b4"])
    for x, v in enumerate(values):
        ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize="small")
    ax.set(ylabel="dAP (AP50 points)", title=f"TIDE: AP50 {a.tide.ap:.1f}")
    return _png(fig)


def confusion_csv(a: Analysis) -> str:
    labels = [*a.class_names, "background"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true \\ predicted", *labels])
    for name, row in zip(labels, a.confusion.tolist(), strict=True):
        writer.writerow([name, *row])
    return buf.getvalue()


def summary(a: Analysis) -> dict[str, Any]:
    return {
        "tide": a.tide.to_dict(),
        "ap50_per_class": a.ap50,
        "confusion": {"labels": [*a.class_names, "background"], "matrix": a.confusion.tolist(),
                      "iou_threshold": 0.5, "score_threshold": a.score_threshold},
    }  # fmt: skip


def analysis_guard(inputs: Sequence[str | os.PathLike[str]], overwrite: bool) -> OutputGuard:
    return OutputGuard(COMMAND, inputs=inputs, overwrite=overwrite)


def write_analysis(a: Analysis, out_dir: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]] = (),
                   overwrite: bool = False) -> list[Path]:  # fmt: skip
    """Write the files of the module doc under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    names = planned_files(a.class_names)
    analysis_guard(inputs, overwrite).check([out / n for n in names])
    written = [
        atomic_write_bytes(out / "pr_curves.png", pr_grid_png(a), mark=COMMAND),
        atomic_write_bytes(out / "confusion_matrix.png", confusion_png(a), mark=COMMAND),
        atomic_write_text(out / "confusion_matrix.csv", confusion_csv(a), mark=COMMAND),
        atomic_write_bytes(out / "tide.png", tide_png(a), mark=COMMAND),
        atomic_write_json(out / "analysis.json", summary(a), indent=1, mark=COMMAND),
    ]
    for k, name in enumerate(a.class_names):
        written.append(atomic_write_bytes(out / pr_curve_name(k, name), pr_curve_png(a, k), mark=COMMAND))
    return written
