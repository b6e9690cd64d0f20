"""``eval --report DIR/index.html``: one self-contained HTML page of an evaluation.

The page holds the 12 COCO statistics, the per-class AP table, the precision-recall curves, the
confusion matrix, the TIDE breakdown and the 20 images with the most errors at the drawing
threshold (``visualize.DRAW_SCORE_THRESHOLD`` by default), drawn: ground truth that a detection
found in green, missed boxes in orange, true positives in blue, false positives in red (a detection
inside a crowd / ``difficult`` box is neither). Every picture is embedded as a ``data:`` URI, so the
file can be mailed or opened offline; it loads nothing from anywhere.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from atssdet.data.coco_records import CocoFile
from atssdet.data.image_io import ImageReadError, read_image
from atssdet.evaluation.analysis import ERROR_TYPES, match_image
from atssdet.evaluation.analysis_files import Analysis, confusion_png, pr_grid_png, tide_png
from atssdet.evaluation.coco import STAT_DEFINITIONS, STAT_NAMES
from atssdet.evaluation.report import COMMAND, EvalReport
from atssdet.fileio import atomic_write_text

NUM_WORST_IMAGES = 20
_MAX_SIDE = 512  # drawn images are shrunk to this side (the page stays a few MB)
_COLOURS = {"found": (60, 180, 60), "missed": (0, 140, 255), "tp": (220, 120, 30), "fp": (40, 40, 220)}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } .grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 340px; } figcaption { font-size: 0.85em; color: #555; }
.key span { display: inline-block; padding: 0 6px; margin-right: 6px; color: white; border-radius: 3px; }
"""


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pct(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) or v < 0 else f"{100 * v:.1f}"


def _by_image(results: Sequence[dict[str, Any]], threshold: float) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        if r["score"] >= threshold:
            out.setdefault(int(r["image_id"]), []).append(r)
    for dets in out.values():
        dets.sort(key=lambda d: -d["score"])
    return out


def worst_images(gt: CocoFile, results: Sequence[dict[str, Any]], threshold: float,
                 n: int = NUM_WORST_IMAGES) -> list[tuple[int, dict[str, Any]]]:  # fmt: skip
    """The ``n`` images with the most false positives + misses at ``threshold``: (image id, drawing data)."""
    t = gt.annotations
    dets_by_image = _by_image(results, threshold)
    lookup = {c: i for i, c in enumerate(sorted(gt.categories))}
    scored = []
    for image_id in gt.images:
        rows = np.flatnonzero(t.image_ids == image_id)
        dets = dets_by_image.get(image_id, [])
        d_boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        d_cats = np.array([d["category_id"] for d in dets], dtype=np.int64)
        tp, ignored, matched = match_image(
            t.boxes_xywh[rows], t.category_ids[rows], t.iscrowd[rows], d_boxes, d_cats
        )
        missed = ~matched & ~t.iscrowd[rows]
        errors = int((~tp & ~ignored).sum() + missed.sum())
        if errors:
            scored.append((errors, image_id, {
                "gt": [(t.boxes_xywh[r], lookup[int(t.category_ids[r])], bool(m)) for r, m in zip(rows, missed, strict=True)
                       if not t.iscrowd[r]],
                "dets": [(d_boxes[i], lookup.get(int(d_cats[i]), -1), dets[i]["score"], bool(tp[i]))
                         for i in range(len(dets)) if not ignored[i]],
                "fp": int((~tp & ~ignored).sum()), "missed": int(missed.sum()),
            }))  # fmt: skip
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [(image_id, info) for _, image_id, info in scored[:n]]


def draw_errors(image: np.ndarray, info: dict[str, Any], class_names: Sequence[str]) -> bytes:
    """The image (BGR) with its boxes drawn as the module doc says, as JPEG bytes."""
    scale = min(4.0, _MAX_SIDE / max(image.shape[:2]))  # small images are enlarged (up to 4x) to be seen
    if scale != 1:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
    canvas = np.ascontiguousarray(image)

    def box(xywh: np.ndarray, colour: tuple[int, int, int], width: int, label: str | None) -> None:
        x, y, w, h = (float(v) * scale for v in xywh)
        p1, p2 = (int(round(x)), int(round(y))), (int(round(x + w)), int(round(y + h)))
        cv2.rectangle(canvas, p1, p2, colour, width, cv2.LINE_AA)
        if label:
            cv2.putText(canvas, label, (p1[0] + 2, max(p1[1] - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                        cv2.LINE_AA)  # fmt: skip

    for xywh, k, missed in info["gt"]:
        box(xywh, _COLOURS["missed" if missed else "found"], 2 if missed else 1,
            f"MISS {class_names[k]}" if missed else None)  # fmt: skip
    for xywh, k, score, tp in info["dets"]:
        name = class_names[k] if 0 <= k < len(class_names) else "?"
        box(xywh, _COLOURS["tp" if tp else "fp"], 1 if tp else 2, None if tp else f"FP {name} {score:.2f}")
    ok, data = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert ok
    return bytes(data)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (1, 2)) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{c}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_report(report: EvalReport, analysis: Analysis, gt: CocoFile, results: Sequence[dict[str, Any]],
                  image_root: str | os.PathLike[str], *, title: str) -> str:  # fmt: skip
    """The page's HTML text (see the module doc)."""
    esc = html.escape
    stat_rows = [
        (esc(k), _pct(report.stats.get(k, -1.0)), esc(STAT_DEFINITIONS.get(k, ""))) for k in STAT_NAMES
    ]
    stats = _table(["statistic", "value", "definition"], stat_rows, numeric=(1,))
    per_class = _table(["class", "AP", "AP50"],
                       [(esc(n), _pct(report.per_class_ap.get(n, math.nan)), _pct(analysis.ap50.get(n, math.nan)))
                        for n in analysis.class_names])  # fmt: skip
    tide = analysis.tide
    tide_rows = [(k, f"{tide.delta_ap[k]:.2f}", str(tide.counts[k])) for k in ERROR_TYPES]
    figures = []
    root = Path(image_root)
    for image_id, info in worst_images(gt, results, analysis.score_threshold):
        record = gt.images[image_id]
        caption = f"{esc(record.file_name)}: {info['fp']} false positive(s), {info['missed']} missed"
        try:
            src = _data_uri(
                draw_errors(read_image(root / record.file_name), info, analysis.class_names), "image/jpeg"
            )
        except ImageReadError as exc:
            figures.append(
                f"<figure><figcaption>{caption} (not drawn: {esc(str(exc))})</figcaption></figure>"
            )
            continue
        figures.append(f'<figure><img class="worst" alt="{esc(record.file_name)}" src="{src}"><figcaption>{caption}'
                       "</figcaption></figure>")  # fmt: skip
    key = "".join(f'<span style="background: rgb{tuple(reversed(c))}">{n}</span>' for n, c in
                  (("found", _COLOURS["found"]), ("missed", _COLOURS["missed"]), ("true positive", _COLOURS["tp"]),
                   ("false positive", _COLOURS["fp"])))  # fmt: skip
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head><body>
<h1>{esc(title)}</h1>
<p>{report.num_images} images, {report.num_detections} detections.</p>
<h2>COCO statistics</h2>{stats}
<h2>Per-class AP</h2>{per_class}
<h2>Precision-recall curves</h2><img id="pr" alt="precision-recall curves" src="{_data_uri(pr_grid_png(analysis), "image/png")}">
<h2>Confusion matrix</h2><p>IoU 0.5, detections scoring at least {analysis.score_threshold:g}; the last row and
column are the background (false positives, misses).</p>
<img id="confusion" alt="confusion matrix" src="{_data_uri(confusion_png(analysis), "image/png")}">
<h2>TIDE error breakdown</h2><p>AP50 {tide.ap:.2f}; dAP: the AP50 points fixing each error type would recover
(Bolya et al., ECCV 2020).</p>
{_table(["error", "dAP", "count"], tide_rows)}
<img id="tide" alt="TIDE breakdown" src="{_data_uri(tide_png(analysis), "image/png")}">
<h2>The {len(figures)} images with the most errors</h2><p class="key">{key}</p>
<div class="grid">{"".join(figures)}</div>
</body></html>
"""


def write_report_html(path: str | os.PathLike[str], report: EvalReport, analysis: Analysis, gt: CocoFile,
                      results: Sequence[dict[str, Any]], image_root: str | os.PathLike[str], *,
                      title: str = "atssdet evaluation") -> Path:  # fmt: skip
    """Write the page atomically (the caller has checked ``path`` with the output guard)."""
    return atomic_write_text(
        path, render_report(report, analysis, gt, results, image_root, title=title), mark=COMMAND
    )
