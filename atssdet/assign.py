"""ATSS label assignment (Zhang et al. 2020, "Bridging the Gap Between Anchor-based and Anchor-free
Detection via Adaptive Training Sample Selection"), as MegEngine's ``models/atss.py`` does it.

The function is pure, runs without autograd and is vectorised over images, gt boxes and points
(the only Python loop is over the L pyramid levels).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from atssdet.ops.boxes import xyxy_to_ltrb
from atssdet.ops.losses import centerness_target


class ATSSAssignment(NamedTuple):
    """Result of :func:`atss_assign` for a batch of N images and A points.

    ``target_ltrb`` and ``target_ctrness`` are defined for every point: for background points they are
    measured against the image's first valid gt box (MegEngine's argmax over a column of -1s picks gt 0);
    in an image with no gt box they are 0. Only foreground entries are used by the loss.
    """

    matched_gt: Tensor  # [N, A] int64, index into the M gt slots, -1 = background
    target_ltrb: Tensor  # [N, A, 4] float32, (x - x1, y - y1, x2 - x, y2 - y) in input pixels
    target_ctrness: Tensor  # [N, A] float32 centerness of target_ltrb


def _nearest_k_indices(distances: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` of the ``k`` smallest ``distances`` ``[..., P]``, ascending, ties to the smaller index.

    ``torch.topk`` does not say which of equal values it returns. Only a tie across the k-th place
    changes the chosen *set*, so rows with one (k-th value == (k+1)-th value) are redone as a stable
    sort would pick them; the others keep topk's indices (order inside the set does not matter).
    On the CPU, where reading a tensor costs nothing, only the tied rows are redone; on a GPU the
    redo is computed for every row (:func:`_stable_nearest_k`), so the host never waits to learn
    whether there is a tie.
    """
    p = distances.shape[-1]
    if k >= p:
        return torch.arange(p, device=distances.device).expand(*distances.shape[:-1], -1)
    values, indices = distances.topk(k + 1, dim=-1, largest=False, sorted=True)
    indices = indices[..., :k]
    tied = values[..., k - 1] == values[..., k]  # [...]
    if distances.device.type != "cpu":
        return torch.where(tied[..., None], _stable_nearest_k(distances, values[..., k - 1 : k], k), indices)
    if bool(tied.any()):
        stable = torch.sort(distances[tied], dim=-1, stable=True).indices[..., :k]
        indices = indices.clone()
        indices[tied] = stable
    return indices


def _stable_nearest_k(distances: Tensor, kth: Tensor, k: int) -> Tensor:
    """The first ``k`` indices of a stable ascending sort of ``distances [..., P]``, without sorting
    the rows: every point nearer than ``kth [..., 1]`` (the k-th smallest value) plus the lowest-index
    points at that value, then ordered by (distance, index)."""
    nearer = distances < kth  # fewer than k per row
    at_kth = distances == kth
    take = nearer | (at_kth & (at_kth.cumsum(-1) <= k - nearer.sum(-1, keepdim=True)))  # k per row
    # Scatter the k taken indices (in index order) to slots 0..k-1; all others go to slot k, dropped.
    slot = torch.where(take, take.cumsum(-1) - 1, k)
    point_idx = torch.arange(distances.shape[-1], device=distances.device).expand_as(slot)
    chosen = torch.zeros((*distances.shape[:-1], k + 1), dtype=torch.long, device=distances.device)
    chosen = chosen.scatter_(-1, slot, point_idx)[..., :k]
    order = torch.sort(torch.gather(distances, -1, chosen), dim=-1, stable=True).indices
    return torch.gather(chosen, -1, order)


@torch.no_grad()
def atss_assign(
    points_xy: Tensor,
    num_points_per_level: Sequence[int],
    strides: Sequence[int],
    gt_boxes_xyxy: Tensor,
    gt_valid: Tensor,
    *,
    anchor_scale: float = 8.0,
    topk: int = 9,
) -> ATSSAssignment:
    """Assign each point to at most one gt box with ATSS (the paper's "nearest 9 per level" rule).

    Args:
        points_xy: ``[A, 2]`` point centres (x, y) in input pixels, levels concatenated p3 first.
        num_points_per_level: L counts summing to A.
        strides: L strides; the virtual anchor at a level-l point is a square of side ``anchor_scale * stride_l``.
        gt_boxes_xyxy: ``[N, M, 4]`` gt boxes per image, padded to M slots.
        gt_valid: ``[N, M]`` bool, which slots hold a real box (``M = 0`` or all-False rows are fine).
        anchor_scale: side of the virtual anchor in strides (MegEngine ``anchor_scale``, 8).
        topk: candidates per gt and level (MegEngine ``anchor_topk``, 9).

    Rule (equal to MegEngine <= 1.11 / the ``_nearest`` reference arrays): per gt and level, the ``topk``
    points nearest to the gt centre are candidates (ties to the smaller point index); the threshold is
    mean + population std (ddof 0) of the candidates' IoUs with the gt; a point is positive for the gt
    if it is a candidate, its IoU >= threshold and it lies strictly inside the box (min ltrb > 0); a
    point positive for several gts takes the one with the highest IoU (ties to the lower gt index).

    Differences from MegEngine, where it fails: an image without gt boxes gets all points background
    (MegEngine raises in ``F.topk``); a level with fewer than ``topk`` points contributes all of its
    points as candidates (MegEngine raises), so the statistics use ``sum_l min(topk, n_l)`` IoUs.

    IoUs and distances are computed in float64: the reference arrays were reproduced bit-exactly by a
    float64 implementation, and exact squared distances keep grid ties true ties.

    Returns:
        :class:`ATSSAssignment` with ``matched_gt [N, A]`` and the regression/centerness targets.
    """
    if points_xy.dim() != 2 or points_xy.shape[1] != 2:
        raise ValueError(f"points_xy must be [A, 2], got {tuple(points_xy.shape)}")
    if gt_boxes_xyxy.dim() != 3 or gt_boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"gt_boxes_xyxy must be [N, M, 4], got {tuple(gt_boxes_xyxy.shape)}")
    if tuple(gt_valid.shape) != tuple(gt_boxes_xyxy.shape[:2]):
        raise ValueError(
            f"gt_valid must be [N, M] = {tuple(gt_boxes_xyxy.shape[:2])}, got {tuple(gt_valid.shape)}"
        )
    if len(num_points_per_level) != len(strides) or sum(num_points_per_level) != points_xy.shape[0]:
        raise ValueError(
            f"num_points_per_level {tuple(num_points_per_level)} must have one entry per stride "
            f"{tuple(strides)} and sum to A = {points_xy.shape[0]}"
        )
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")

    n, m = gt_boxes_xyxy.shape[:2]
    a = points_xy.shape[0]
    device = points_xy.device
    out_dtype = torch.float32
    if m == 0:
        return ATSSAssignment(
            matched_gt=torch.full((n, a), -1, dtype=torch.long, device=device),
            target_ltrb=torch.zeros((n, a, 4), dtype=out_dtype, device=device),
            target_ctrness=torch.zeros((n, a), dtype=out_dtype, device=device),
        )

    work = torch.float64 if device.type != "mps" else torch.float32
    points = points_xy.to(work)  # [A, 2]
    gt = gt_boxes_xyxy.to(device=device, dtype=work)  # [N, M, 4]
    valid = gt_valid.to(device=device, dtype=torch.bool)  # [N, M]

    # Candidates: per level the topk points nearest the gt centre. Squared distances (monotone in
    # the distance) are exact in float64 for float32 inputs, so grid ties are true ties.
    centres = (gt[..., :2] + gt[..., 2:]) / 2  # [N, M, 2]
    dx = centres[..., 0, None] - points[:, 0]
    dy = centres[..., 1, None] - points[:, 1]
    distances = dx * dx + dy * dy  # [N, M, A]
    candidate_idx_list = []
    start = 0
    for count in num_points_per_level:
        if count > 0:
            level = distances[..., start : start + count]
            candidate_idx_list.append(_nearest_k_indices(level, min(topk, count)) + start)
        start += count
    candidate_idx = torch.cat(candidate_idx_list, dim=-1)  # [N, M, K], K = sum_l min(topk, n_l)

    # Everything else only needs the K candidates of each gt.
    half_side = torch.cat(
        [
            torch.full((count,), anchor_scale * s / 2.0, dtype=work, device=device)
            for count, s in zip(num_points_per_level, strides, strict=True)
        ]
    )[candidate_idx]  # [N, M, K]
    cand_x = points[:, 0][candidate_idx]
    cand_y = points[:, 1][candidate_idx]
    gx1, gy1, gx2, gy2 = (gt[..., i, None] for i in range(4))  # each [N, M, 1]
    inter_w = (torch.minimum(gx2, cand_x + half_side) - torch.maximum(gx1, cand_x - half_side)).clamp(min=0)
    inter_h = (torch.minimum(gy2, cand_y + half_side) - torch.maximum(gy1, cand_y - half_side)).clamp(min=0)
    inter = inter_w * inter_h
    anchor_area = (2 * half_side) * (2 * half_side)
    ious = inter / ((gx2 - gx1) * (gy2 - gy1) + anchor_area - inter)  # [N, M, K]

    mean = ious.mean(dim=-1, keepdim=True)
    std = torch.sqrt(((ious - mean) ** 2).mean(dim=-1, keepdim=True))  # population std (ddof 0)
    # min(ltrb) > 0 <=> strictly inside; comparing coordinates is exact where a subtraction might round.
    inside = (cand_x > gx1) & (cand_y > gy1) & (gx2 > cand_x) & (gy2 > cand_y)
    positive = (ious >= mean + std) & inside & valid[..., None]  # [N, M, K]

    # Highest IoU wins. Non-positive slots of real gts hold -1, padding slots -2, so a point without
    # positives picks the first valid gt (MegEngine's argmax over a column of -1s picks gt 0);
    # argmax returns the first maximum, so ties go to the lower gt index.
    scores = torch.where(valid, -1.0, -2.0).to(work)[..., None].expand(n, m, a).clone()  # [N, M, A]
    scores.scatter_(2, candidate_idx, torch.where(positive, ious, torch.full_like(ious, -1.0)))
    best_score, best = scores.max(dim=1)  # [N, A]
    matched_gt = torch.where(best_score > -1.0, best, torch.full_like(best, -1))

    matched_boxes = torch.gather(
        gt_boxes_xyxy.to(device=device, dtype=out_dtype), 1, best[..., None].expand(n, a, 4)
    )  # [N, A, 4]
    target_ltrb = xyxy_to_ltrb(points_xy.to(out_dtype), matched_boxes)
    target_ctrness = centerness_target(target_ltrb)
    has_gt = valid.any(dim=1)  # [N]
    target_ltrb = torch.where(has_gt[:, None, None], target_ltrb, torch.zeros_like(target_ltrb))
    target_ctrness = torch.where(has_gt[:, None], target_ctrness, torch.zeros_like(target_ctrness))
    return ATSSAssignment(matched_gt=matched_gt, target_ltrb=target_ltrb, target_ctrness=target_ctrness)
