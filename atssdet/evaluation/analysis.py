"""Why a detector misses: the TIDE error breakdown and a confusion matrix, from COCO results.

**TIDE** (Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV
2020), with the definitions of the paper and of its reference code (``tidecv`` 1.0.1), at the
foreground IoU ``t_f = 0.5`` and background IoU ``t_b = 0.1``, 100 detections per image:

* each image's detections, highest score first, take the unmatched ground truth box of their class
  with the highest IoU when it is ``>= t_f`` (a true positive); an unmatched detection whose crowd
  IoU with a crowd box (``iscrowd`` / VOC ``difficult``) of its class is ``> t_f`` is ignored;
* every other detection gets the first error that applies: **Loc** (``t_b <= IoU <= t_f`` with a
  box of its class), **Cls** (``IoU >= t_f`` with a box of another class), **Dupe** (``IoU >= t_f``
  with a box of its class already taken), **Bkg** (``IoU <= t_b`` with every box), else **Both**;
* **Miss**: a ground truth box no detection took and no Loc/Cls error could fix;
* the AP each error type would recover (dAP, in AP points 0..100 at IoU 0.5, TIDE's 101-point AP):
  Cls / Loc errors become true positives (one per ground truth box: the highest-scored error), Dupe /
  Bkg / Both detections are removed, missed boxes are removed from the ground truth.

``tidecv`` itself is not used: it is unmaintained since 2020, declares the non-headless
``opencv-python`` (which would replace this project's ``cv2``) and imports pandas and seaborn for its
plots; ``tests/test_analysis.py`` checks this code against it (where it installs) and against
hand-computed cases.

**Confusion matrix** at IoU 0.5 over detections scored at least ``score_threshold``: rows are the
true class, plus a last *background* row (a detection that matches no box: a false positive);
columns the predicted class, plus a last *background* column (a box no detection matches: a miss).
Boxes and detections are paired one to one by IoU, highest first, whatever their classes (the
rule of Ultralytics' matrix); detections inside crowd boxes are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from atssdet.data.coco_records import CocoFile

ERROR_TYPES = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")
_FIXED_TO_TRUE = ("Cls", "Loc")


@dataclass
class TideReport:
    """TIDE's result: ``ap`` (AP50, 0..100), the dAP and the count of each error type, per-image counts."""

    ap: float
    delta_ap: dict[str, float]  # ERROR_TYPES -> AP points each would recover
    counts: dict[str, int]
    image_errors: dict[int, dict[str, int]] = field(default_factory=dict)  # image id -> type -> count

    def to_dict(self) -> dict[str, Any]:
        return {"ap50": self.ap, "delta_ap": self.delta_ap, "counts": self.counts}


@dataclass
class _Error:
    kind: str
    cls: int  # the detection's class (Miss: the box's)
    pred: int  # global prediction index (-1 for Miss)
    score: float
    counted: bool  # the prediction is in the AP data (not ignored)
    gt: int = -1  # global gt index of a fixable Cls / Loc error, the missed box of a Miss
    fix_cls: int = -1  # the class it is fixed to (Cls: the box's class; Loc: its own)


@dataclass
class _Run:
    gt_pos: dict[int, int] = field(default_factory=dict)  # class -> positives
    points: dict[int, list[tuple[float, bool]]] = field(default_factory=dict)  # class -> (score, tp)
    errors: list[_Error] = field(default_factory=list)
    best: dict[int, tuple[float, int]] = field(default_factory=dict)  # gt -> (best error score, pred)
    usable: set[int] = field(default_factory=set)


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: bool) -> np.ndarray:
    if len(dets) == 0 or len(gts) == 0:
        return np.zeros((len(dets), len(gts)))
    return np.asarray(mask_utils.iou(dets.tolist(), gts.tolist(), [int(crowd)] * len(gts)), dtype=np.float64)


def _by_image(results: Sequence[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(int(r["image_id"]), []).append(r)
    return out


def _gt_by_image(gt: CocoFile) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """image id -> (boxes xywh [G, 4], category ids [G], crowd [G], global gt index [G])."""
    t = gt.annotations
    order = np.argsort(t.image_ids, kind="stable")
    keys, starts = np.unique(t.image_ids[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    return {
        int(k): (t.boxes_xywh[order[a:b]], t.category_ids[order[a:b]], t.iscrowd[order[a:b]], order[a:b])
        for k, a, b in zip(keys, starts, ends, strict=True)
    }


def tide_errors(
    gt: CocoFile,
    results: Sequence[dict[str, Any]],
    *,
    pos_thresh: float = 0.5,
    bg_thresh: float = 0.1,
    max_dets: int = 100,
) -> TideReport:
    """The TIDE breakdown of COCO ``results`` against ``gt`` (see the module doc)."""
    run = _Run()
    preds = _by_image(results)
    gts = _gt_by_image(gt)
    empty = (np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.int64))
    image_errors: dict[int, dict[str, int]] = {}
    next_pred = 0
    for image_id in gt.images:
        before = len(run.errors)
        next_pred = _tide_image(run, preds.get(image_id, []), gts.get(image_id, empty), next_pred,
                                pos_thresh, bg_thresh, max_dets)  # fmt: skip
        if len(run.errors) > before:
            image_errors[image_id] = _count(run.errors[before:])
    base = _map(run.points, run.gt_pos)
    delta = {kind: max(_map(*_fixed(run, kind)) - base, 0.0) for kind in ERROR_TYPES}
    return TideReport(base, delta, _count(run.errors), image_errors)


def _count(errors: list[_Error]) -> dict[str, int]:
    counts = dict.fromkeys(ERROR_TYPES, 0)
    for e in errors:
        counts[e.kind] += 1
    return counts


def _tide_image(run: _Run, dets: list[dict[str, Any]], gt: tuple[np.ndarray, ...], start: int,
                pos: float, bg: float, max_dets: int) -> int:  # fmt: skip
    boxes, cats, crowd, gt_index = gt
    real, ignore = ~crowd.astype(bool), crowd.astype(bool)
    g_boxes, g_cats, g_index = boxes[real], cats[real], gt_index[real]
    for c in g_cats.tolist():
        run.gt_pos[c] = run.gt_pos.get(c, 0) + 1
    dets = sorted(dets, key=lambda d: -d["score"])[:max_dets]  # stable, as Python's list.sort
    p_boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
    p_cats = np.array([d["category_id"] for d in dets], dtype=np.int64)
    scores = [float(d["score"]) for d in dets]
    ids = list(range(start, start + len(dets)))
    if not dets:
        for c, g in zip(g_cats.tolist(), g_index.tolist(), strict=True):
            run.errors.append(_Error("Miss", c, -1, 0.0, False, g, c))
        return start
    iou = _iou(p_boxes, g_boxes, crowd=False)
    same = p_cats[:, None] == g_cats[None, :]
    cls_iou = iou * same
    used = np.zeros(len(dets), dtype=object)  # True / False / None (ignored), as tidecv
    used[:] = False
    gt_used = np.zeros(len(g_boxes), bool)
    buffer = cls_iou.copy()
    for i in range(len(dets)):  # greedy matching in score order: sequential by definition
        j = int(np.argmax(buffer[i])) if buffer.shape[1] else -1
        if j >= 0 and buffer[i, j] >= pos:
            used[i], gt_used[j] = True, True
            buffer[:, j] = 0
    for region, rc in zip(boxes[ignore], cats[ignore].tolist(), strict=True):
        crowd_iou = _iou(p_boxes, region[None], crowd=True)[:, 0]
        hit = (used == False) & (crowd_iou > pos) & (p_cats == rc)  # noqa: E712 - None is not False
        used[hit] = None
    for i, s in enumerate(scores):
        c = int(p_cats[i])
        if used[i] is not None:
            run.points.setdefault(c, []).append((s, bool(used[i])))
        if used[i] is True:
            continue
        _classify(run, i, ids[i], c, s, used[i] is not None, iou, cls_iou, same, gt_used, g_cats, g_index,
                  pos, bg)  # fmt: skip
    for j in np.flatnonzero(~gt_used).tolist():
        if int(g_index[j]) not in run.usable:
            run.errors.append(_Error("Miss", int(g_cats[j]), -1, 0.0, False, int(g_index[j]), int(g_cats[j])))
    return start + len(dets)


def _classify(run: _Run, i: int, pid: int, c: int, s: float, counted: bool, iou: np.ndarray, cls_iou: np.ndarray,
              same: np.ndarray, gt_used: np.ndarray, g_cats: np.ndarray, g_index: np.ndarray, pos: float,
              bg: float) -> None:  # fmt: skip
    """The error of unmatched detection ``i`` (tidecv's order of tests)."""
    if iou.shape[1] == 0:
        run.errors.append(_Error("Bkg", c, pid, s, counted))
        return
    j = int(np.argmax(cls_iou[i]))
    if bg <= cls_iou[i, j] <= pos:
        run.errors.append(_fixable(run, "Loc", c, c, pid, s, counted, j, gt_used, g_index))
        return
    noncls = iou[i] * ~same[i]
    j = int(np.argmax(noncls))
    if noncls[j] >= pos:
        run.errors.append(_fixable(run, "Cls", c, int(g_cats[j]), pid, s, counted, j, gt_used, g_index))
        return
    used_cls = iou[i] * gt_used * same[i]
    if used_cls.max() >= pos:
        run.errors.append(_Error("Dupe", c, pid, s, counted))
    elif iou[i].max() <= bg:
        run.errors.append(_Error("Bkg", c, pid, s, counted))
    else:
        run.errors.append(_Error("Both", c, pid, s, counted))


def _fixable(run: _Run, kind: str, cls: int, fix_cls: int, pid: int, s: float, counted: bool, j: int,
             gt_used: np.ndarray, g_index: np.ndarray) -> _Error:  # fmt: skip
    """A Cls / Loc error on gt ``j``: fixable (unless that box was matched) by its highest-scored error."""
    g = int(g_index[j])
    if not gt_used[j]:
        run.usable.add(g)
        if run.best.get(g, (-1.0, -1))[0] < s:
            run.best[g] = (s, pid)
        return _Error(kind, cls, pid, s, counted, g, fix_cls)
    return _Error(kind, cls, pid, s, counted, -1, fix_cls)


def _fixed(run: _Run, kind: str) -> tuple[dict[int, list[tuple[float, bool]]], dict[int, int]]:
    """The AP data and positives with every error of ``kind`` fixed (tidecv's ``fix_errors``: the
    errors' data points first, then the true positives, which decides the order of equal scores)."""
    gt_pos = dict(run.gt_pos)
    points: dict[int, list[tuple[float, bool]]] = {}
    for e in run.errors:
        if e.kind == kind:
            if kind == "Miss":
                gt_pos[e.cls] -= 1
            elif kind in _FIXED_TO_TRUE and e.gt >= 0 and run.best[e.gt][1] == e.pred:
                points.setdefault(e.fix_cls, []).append((e.score, True))
        elif e.counted:
            points.setdefault(e.cls, []).append((e.score, False))
    for c, pts in run.points.items():
        points.setdefault(c, []).extend(p for p in pts if p[1])
    return points, gt_pos


def _ap(points: list[tuple[float, bool]], num_gt: int) -> float:
    """TIDE's AP (0..100): COCO's 101-point interpolated precision over recall."""
    if num_gt <= 0:
        return 0.0
    order = sorted(points, key=lambda p: -p[0])
    tp = np.cumsum([p[1] for p in order], dtype=np.float64)
    fp = np.cumsum([not p[1] for p in order], dtype=np.float64)
    if len(order) == 0:
        return 0.0
    precision = np.maximum.accumulate((tp / (tp + fp))[::-1])[::-1]
    recall = tp / num_gt
    idx = np.searchsorted(recall, np.arange(101) / 100, side="left")  # k / 100 exactly, as tidecv
    bars = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(bars.mean() * 100)


def _map(points: dict[int, list[tuple[float, bool]]], gt_pos: dict[int, int]) -> float:
    classes = set(points) | set(gt_pos)
    aps = [_ap(points.get(c, []), gt_pos.get(c, 0)) for c in classes if points.get(c) or gt_pos.get(c, 0) > 0]
    return float(np.mean(aps)) if aps else 0.0


def confusion_matrix(
    gt: CocoFile,
    results: Sequence[dict[str, Any]],
    *,
    iou_threshold: float = 0.5,
    score_threshold: float = 0.3,
) -> np.ndarray:
    """``int64 [C + 1, C + 1]``: rows true class (last: background), columns predicted class (last:
    background), classes in category-id order (see the module doc)."""
    cat_ids = sorted(gt.categories)
    k = len(cat_ids)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    lookup = np.array(cat_ids, dtype=np.int64)
    preds = _by_image([r for r in results if r["score"] >= score_threshold])
    gts = _gt_by_image(gt)
    for image_id in gt.images:
        boxes, cats, crowd, _ = gts.get(
            image_id, (np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, bool), None)
        )
        dets = preds.get(image_id, [])
        p_boxes = np.array([d["bbox"] for d in dets], dtype=np.float64).reshape(-1, 4)
        p_lab = np.searchsorted(lookup, np.array([d["category_id"] for d in dets], dtype=np.int64))
        g_boxes, g_lab = boxes[~crowd], np.searchsorted(lookup, cats[~crowd])
        iou = _iou(p_boxes, g_boxes, crowd=False)
        di, gi = np.nonzero(iou >= iou_threshold)
        order = np.argsort(-iou[di, gi], kind="stable")
        di, gi = di[order], gi[order]
        _, first = np.unique(di, return_index=True)  # each detection's best box ...
        di, gi = di[np.sort(first)], gi[np.sort(first)]
        _, first = np.unique(gi, return_index=True)  # ... and each box's best detection
        di, gi = di[first], gi[first]
        np.add.at(matrix, (g_lab[gi], p_lab[di]), 1)
        missed = np.setdiff1d(np.arange(len(g_boxes)), gi)
        np.add.at(matrix[:, k], g_lab[missed], 1)
        extra = np.setdiff1d(np.arange(len(dets)), di)
        if crowd.any() and len(extra):
            in_crowd = (_iou(p_boxes[extra], boxes[crowd], crowd=True) > iou_threshold).any(axis=1)
            extra = extra[~in_crowd]
        np.add.at(matrix[k], p_lab[extra], 1)
    return matrix


def match_image(
    gt_boxes: np.ndarray, gt_cats: np.ndarray, crowd: np.ndarray, det_boxes: np.ndarray, det_cats: np.ndarray,
    *, iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """COCO-style matching of one image's detections (xywh, sorted by score, highest first) to its boxes:
    ``(true positive [D], ignored inside a crowd box [D], matched box [G])``, bool arrays."""
    real = ~crowd.astype(bool)
    iou = _iou(det_boxes, gt_boxes[real], crowd=False) * (det_cats[:, None] == gt_cats[real][None, :])
    tp = np.zeros(len(det_boxes), bool)
    taken = np.zeros(int(real.sum()), bool)
    for i in range(len(det_boxes)):  # greedy in score order: sequential by definition
        free = np.where(taken, -1.0, iou[i]) if taken.size else iou[i]
        if free.size and free.max() >= iou_threshold:
            j = int(free.argmax())
            tp[i], taken[j] = True, True
    ignored = np.zeros(len(det_boxes), bool)
    if (~real).any() and len(det_boxes):
        inside = _iou(det_boxes, gt_boxes[~real], crowd=True) > iou_threshold
        ignored = ~tp & (inside & (det_cats[:, None] == gt_cats[~real][None, :])).any(axis=1)
    matched = np.zeros(len(gt_boxes), bool)
    matched[np.flatnonzero(real)] = taken
    return tp, ignored, matched
