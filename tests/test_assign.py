"""ATSS assignment: exact parity with MegEngine's `_nearest` reference arrays and hand-built edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atssdet.assign import atss_assign
from atssdet.ops.points import grid_points
from tests.conftest import R18, require_reference

STRIDES = (8, 16, 32, 64, 128)
CASES = (
    "few_large",
    "many_small",
    "overlapping_classes",
    "border",
    "one_vs_thirty",
    "duplicates",
    "grid_aligned_ties",
)


def _points_for(height: int, width: int) -> tuple[torch.Tensor, list[int]]:
    """Points of a padded ``height x width`` input, with level sizes as the model computes them."""
    hw = []
    h, w = height // 8, width // 8
    for _ in STRIDES:
        hw.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    points = grid_points(hw, STRIDES)
    return torch.cat(points), [p.shape[0] for p in points]


def _reference_assign(points: np.ndarray, counts: list[int], boxes: np.ndarray) -> np.ndarray:
    """Slow float64 loop over boxes, straight from the reference README section 4 (nearest rule)."""
    half = np.concatenate([np.full(c, 4.0 * s) for c, s in zip(counts, STRIDES, strict=True)])
    p = points.astype(np.float64)
    anchors = np.concatenate([p - half[:, None], p + half[:, None]], axis=1)
    ious = np.zeros((len(boxes), len(p)))
    positive = np.zeros((len(boxes), len(p)), dtype=bool)
    starts = np.cumsum([0, *counts])
    for g, box in enumerate(boxes.astype(np.float64)):
        iw = np.clip(np.minimum(box[2], anchors[:, 2]) - np.maximum(box[0], anchors[:, 0]), 0, None)
        ih = np.clip(np.minimum(box[3], anchors[:, 3]) - np.maximum(box[1], anchors[:, 1]), 0, None)
        inter = iw * ih
        area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
        ious[g] = inter / ((box[2] - box[0]) * (box[3] - box[1]) + area_a - inter)
        centre = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        dist = np.sqrt(((p - centre) ** 2).sum(1))
        cand = []
        for lo, hi in zip(starts[:-1], starts[1:], strict=True):
            order = np.argsort(dist[lo:hi], kind="stable")[: min(9, hi - lo)]
            cand.extend(lo + order)
        cand_idx = np.array(cand)
        thr = ious[g, cand_idx].mean() + ious[g, cand_idx].std()
        inside = (
            (p[:, 0] - box[0] > 0) & (p[:, 1] - box[1] > 0) & (box[2] - p[:, 0] > 0) & (box[3] - p[:, 1] > 0)
        )
        mask = np.zeros(len(p), dtype=bool)
        mask[cand_idx] = True
        positive[g] = mask & (ious[g] >= thr) & inside
    if len(boxes) == 0:
        return np.full(len(p), -1)
    scores = np.where(positive, ious, -1.0)
    return np.where(positive.any(0), scores.argmax(0), -1)


@pytest.fixture(scope="module")
def assign_ref() -> dict[str, np.ndarray]:
    return dict(np.load(require_reference() / f"{R18}.seed0.assign.npz"))


def _run_case(ref: dict[str, np.ndarray], case: str):
    points = torch.cat([torch.from_numpy(ref[f"anchors_p{lv}"]) for lv in range(3, 8)])
    counts = [ref[f"anchors_p{lv}"].shape[0] for lv in range(3, 8)]
    gt = torch.from_numpy(ref[f"{case}__gt_boxes"])
    num_gts = torch.from_numpy(ref[f"{case}__num_gts"]).long()
    valid = torch.arange(gt.shape[1])[None] < num_gts[:, None]
    result = atss_assign(points, counts, STRIDES, gt[..., :4], valid)
    classes = torch.gather(gt[..., 4], 1, result.matched_gt.clamp(min=0)).long()
    labels = torch.where(result.matched_gt >= 0, classes, 0)
    return result, labels


@pytest.mark.parametrize("case", CASES)
def test_reference_cases_exact(assign_ref: dict[str, np.ndarray], case: str) -> None:
    result, labels = _run_case(assign_ref, case)
    np.testing.assert_array_equal(labels.numpy(), assign_ref[f"{case}__labels_nearest"])
    # Bit-exact, background included (measured against gt 0 as in MegEngine).
    np.testing.assert_array_equal(result.target_ltrb.numpy(), assign_ref[f"{case}__offsets_nearest"])
    np.testing.assert_array_equal(result.target_ctrness.numpy(), assign_ref[f"{case}__ctrness_nearest"])


def test_train_step_assignment_exact(reference_dir) -> None:
    ref = np.load(reference_dir / f"{R18}.seed0.train_step.npz")
    points, counts = _points_for(1120, 800)
    gt = torch.from_numpy(ref["gt_boxes"])
    valid = torch.arange(gt.shape[1])[None] < torch.from_numpy(ref["im_info"][:, 4]).long()[:, None]
    result = atss_assign(points, counts, STRIDES, gt[..., :4], valid)
    classes = torch.gather(gt[..., 4], 1, result.matched_gt.clamp(min=0)).long()
    labels = torch.where(result.matched_gt >= 0, classes, 0)
    np.testing.assert_array_equal(labels.numpy(), ref["gt_labels_nearest"])
    assert int((labels > 0).sum()) == 98
    np.testing.assert_array_equal(result.target_ltrb.numpy(), ref["gt_offsets_nearest"])
    np.testing.assert_array_equal(result.target_ctrness.numpy(), ref["gt_ctrness_nearest"])


def test_zero_boxes_all_background() -> None:
    points, counts = _points_for(64, 64)
    for boxes, valid in (
        (torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool)),
        (torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)),
    ):
        result = atss_assign(points, counts, STRIDES, boxes, valid)
        assert result.matched_gt.shape == (2, points.shape[0])
        assert bool((result.matched_gt == -1).all())
        assert bool((result.target_ltrb == 0).all()) and bool((result.target_ctrness == 0).all())


def test_image_without_boxes_next_to_image_with_boxes() -> None:
    points, counts = _points_for(128, 128)
    box = torch.tensor([20.0, 30.0, 90.0, 100.0])
    boxes = torch.stack([torch.stack([box, torch.zeros(4)]), torch.zeros(2, 4)])
    valid = torch.tensor([[True, False], [False, False]])
    batched = atss_assign(points, counts, STRIDES, boxes, valid)
    single = atss_assign(points, counts, STRIDES, box.view(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    assert torch.equal(batched.matched_gt[0], single.matched_gt[0])
    assert bool((batched.matched_gt[0] >= 0).any())
    assert bool((batched.matched_gt[1] == -1).all())


def test_tiny_box_gets_the_single_point_inside() -> None:
    # A 4x4 box strictly contains only the p3 point (12, 12); that point has the largest IoU among
    # the candidates (its 64-px anchor contains the box), so it is the one positive.
    points, counts = _points_for(64, 64)
    result = atss_assign(
        points,
        counts,
        STRIDES,
        torch.tensor([[[10.0, 10.0, 14.0, 14.0]]]),
        torch.ones(1, 1, dtype=torch.bool),
    )
    positives = (result.matched_gt[0] == 0).nonzero().flatten().tolist()
    assert len(positives) == 1
    assert points[positives[0]].tolist() == [12.0, 12.0]
    assert result.target_ltrb[0, positives[0]].tolist() == [2.0, 2.0, 2.0, 2.0]
    assert float(result.target_ctrness[0, positives[0]]) == 1.0


def test_tiny_image_levels_with_fewer_points_than_topk() -> None:
    # 32x32 input: p3 4x4, p4 2x2, p5..p7 1x1; MegEngine's topk fails there, we take every point.
    points, counts = _points_for(32, 32)
    assert counts == [16, 4, 1, 1, 1]
    boxes = np.array(
        [[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 20.0, 14.0], [17.0, 1.0, 31.0, 30.0]], dtype=np.float32
    )
    result = atss_assign(
        points, counts, STRIDES, torch.from_numpy(boxes)[None], torch.ones(1, 3, dtype=torch.bool)
    )
    expected = _reference_assign(points.numpy(), counts, boxes)
    np.testing.assert_array_equal(result.matched_gt[0].numpy(), expected)
    # 64x64: p5 has 4 points, p6 and p7 one each; these boxes do get positives.
    points, counts = _points_for(64, 64)
    assert counts == [64, 16, 4, 1, 1]
    boxes = np.array(
        [[2.0, 3.0, 30.0, 41.0], [20.0, 16.0, 62.0, 60.0], [40.0, 4.0, 47.0, 13.0]], dtype=np.float32
    )
    result = atss_assign(
        points, counts, STRIDES, torch.from_numpy(boxes)[None], torch.ones(1, 3, dtype=torch.bool)
    )
    np.testing.assert_array_equal(
        result.matched_gt[0].numpy(), _reference_assign(points.numpy(), counts, boxes)
    )
    assert set(result.matched_gt[0].tolist()) == {-1, 0, 1, 2}


def test_zero_width_box_has_no_positives_and_finite_targets() -> None:
    points, counts = _points_for(64, 96)
    result = atss_assign(
        points, counts, STRIDES, torch.tensor([[[40.0, 8.0, 40.0, 56.0]]]), torch.ones(1, 1, dtype=torch.bool)
    )
    assert bool((result.matched_gt == -1).all())
    assert bool(torch.isfinite(result.target_ltrb).all()) and bool(
        torch.isfinite(result.target_ctrness).all()
    )


@pytest.mark.parametrize("seed", range(4))
def test_random_boxes_match_loop_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    points, counts = _points_for(192, 256)
    xy = rng.uniform(0, 200, size=(12, 2))
    wh = rng.uniform(2, 120, size=(12, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[3] = boxes[2]  # a duplicate: the lower index must win
    result = atss_assign(
        points, counts, STRIDES, torch.from_numpy(boxes)[None], torch.ones(1, 12, dtype=torch.bool)
    )
    np.testing.assert_array_equal(
        result.matched_gt[0].numpy(), _reference_assign(points.numpy(), counts, boxes)
    )
    assert not bool((result.matched_gt == 3).any())


def test_bad_shapes_raise() -> None:
    points, counts = _points_for(64, 64)
    with pytest.raises(ValueError, match="gt_boxes_xyxy"):
        atss_assign(points, counts, STRIDES, torch.zeros(3, 4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="gt_valid"):
        atss_assign(points, counts, STRIDES, torch.zeros(1, 3, 4), torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_points_per_level"):
        atss_assign(points, counts[:-1], STRIDES, torch.zeros(1, 3, 4), torch.ones(1, 3, dtype=torch.bool))
