"""Sliced inference for small objects in large images (what SAHI calls "slicing aided hyper inference").

An image is cut into square tiles of ``SliceOptions.size`` original pixels that overlap by
``overlap * size`` (the last row/column of tiles is shifted back to end at the image border, as SAHI
does). Every tile is resized by the detector's own rule, so a small object in a tile is seen
``short_size / size`` times larger than in the whole image resized. Tiles share one size, hence one
padded input size, and go through the model ``batch_size`` tiles per forward pass
(:meth:`~atssdet.detector.Detector.detect_resized`; the test counts the forwards). Detections are
shifted back by their tile's origin and merged:

* **Boxes cut by tile borders.** A box touching a tile edge that lies inside the image
  (:func:`cut_by_tile`) is a part of an object that continues in the next tile. Where another tile
  (or the full-image pass) saw the whole object, i.e. a same-class uncut box covers the cut box by
  more than ``merge_threshold`` of its area, the cut box is dropped (:func:`drop_cut_duplicates`).
* **Duplicates** from overlapping tiles are then merged by ``"nms"`` (torchvision's batched NMS on IoU,
  keeps the best box) or ``"nmm"`` (:func:`greedy_nmm`: SAHI's greedy non-maximum merging on
  intersection over the smaller box; a group's cut members grow it to their union box, so the two
  halves of an object larger than the overlap become one box, while whole boxes are only suppressed).

Why not SAHI itself: ``sahi.predict.get_sliced_prediction`` runs one forward pass per tile and merges
with Python loops over predictions (``ObjectPrediction`` objects, shapely polygons); here tiles are
batched and every step is a tensor operation (``benchmarks/bench_slicing.py`` times both merges). SAHI
users can still plug atssdet in: :mod:`atssdet.integrations.sahi_model`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from atssdet.data.transforms import resize_shortest_edge
from atssdet.detector_inputs import error_result, prepare_input
from atssdet.errors import OptionError
from atssdet.options import InferenceOptions
from atssdet.structures import Detections

if TYPE_CHECKING:
    from atssdet.detector import Detector, ImageInput

DEFAULT_TILE_BATCH = 8  # tiles per forward pass when neither SliceOptions nor the caller says
CUT_MARGIN = 2.0  # a box edge within this many pixels of an inner tile edge counts as cut
_PAIR_CHUNK = 4096  # rows of a pairwise matrix computed at once


def tile_starts(length: int, size: int, overlap: float) -> Tensor:
    """Tile origins along one axis of ``length`` pixels: every ``size - round(size * overlap)`` pixels,
    the last one moved to ``length - size`` so the tiles end at the border. Needs ``size <= length``."""
    step = max(1, size - int(round(size * overlap)))
    starts = torch.arange(0, length - size + 1, step, dtype=torch.long)
    if int(starts[-1]) + size < length:
        starts = torch.cat((starts, torch.tensor([length - size])))
    return starts


def tile_windows(height: int, width: int, size: int, overlap: float) -> Tensor:
    """``[T, 4]`` int64 xyxy windows (row-major) covering a ``height x width`` image with ``size`` tiles.

    Raises :class:`~atssdet.errors.OptionError` when ``size`` exceeds the width or the height.
    """
    if size > height or size > width:
        raise OptionError(
            f"slice size {size} is larger than the {width}x{height} image; "
            f"use a slice size <= {min(height, width)} or no slicing"
        )
    ys, xs = torch.meshgrid(
        tile_starts(height, size, overlap), tile_starts(width, size, overlap), indexing="ij"
    )
    x, y = xs.reshape(-1), ys.reshape(-1)
    return torch.stack((x, y, x + size, y + size), dim=1)


def cut_by_tile(
    boxes: Tensor, windows: Tensor, image_hw: tuple[int, int], margin: float = CUT_MARGIN
) -> Tensor:
    """``[K]`` bool: box k touches an edge of its window ``windows[k]`` that is not an image border."""
    h, w = image_hw
    win = windows.to(boxes.dtype)
    left = (boxes[:, 0] <= win[:, 0] + margin) & (win[:, 0] > 0)
    top = (boxes[:, 1] <= win[:, 1] + margin) & (win[:, 1] > 0)
    right = (boxes[:, 2] >= win[:, 2] - margin) & (win[:, 2] < w)
    bottom = (boxes[:, 3] >= win[:, 3] - margin) & (win[:, 3] < h)
    return left | top | right | bottom


def pairwise_ios(a: Tensor, b: Tensor) -> Tensor:
    """``[A, B]`` intersection over the smaller box's area (SAHI's ``IOS`` match metric)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-9)


def _matches(a: Tensor, la: Tensor, b: Tensor, lb: Tensor, threshold: float, agnostic: bool) -> Tensor:
    """``[A, B]`` bool: IoS > threshold (and the same label unless ``agnostic``)."""
    m = pairwise_ios(a, b) > threshold
    return m if agnostic else m & (la[:, None] == lb[None, :])


def drop_cut_duplicates(
    boxes: Tensor, labels: Tensor, cut: Tensor, threshold: float, agnostic: bool = False
) -> Tensor:
    """``[K]`` bool keep mask: a cut box is dropped when an uncut box (of its class) covers more than
    ``threshold`` of its area; uncut boxes and unmatched cut boxes are kept."""
    keep = torch.ones(len(boxes), dtype=torch.bool)
    cut_idx, whole_idx = cut.nonzero().flatten(), (~cut).nonzero().flatten()
    if len(cut_idx) == 0 or len(whole_idx) == 0:
        return keep
    for start in range(0, len(cut_idx), _PAIR_CHUNK):  # chunks bound the [C, U] matrix, not a box loop
        rows = cut_idx[start : start + _PAIR_CHUNK]
        m = _matches(boxes[rows], labels[rows], boxes[whole_idx], labels[whole_idx], threshold, agnostic)
        keep[rows[m.any(1)]] = False
    return keep


def _match_edges(boxes: Tensor, groups: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Pairs ``(i, j)``, ``i < j``, of boxes in the same group with IoS > ``threshold``, as two index
    tensors. One ``[rows, K_g]`` matrix per group and chunk of rows (a loop over classes and chunks,
    not over boxes), so the memory is bounded and boxes of different classes are never compared."""
    heads, tails = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for g in torch.unique(groups).tolist():
        idx = (groups == g).nonzero().flatten()
        for start in range(0, len(idx), _PAIR_CHUNK):
            rows = idx[start : start + _PAIR_CHUNK]
            m = (pairwise_ios(boxes[rows], boxes[idx]) > threshold) & (idx[None, :] > rows[:, None])
            r, c = m.nonzero(as_tuple=True)
            heads.append(rows[r])
            tails.append(idx[c])
    return torch.cat(heads), torch.cat(tails)


def greedy_nmm(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    threshold: float,
    agnostic: bool = False,
    extend: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """SAHI's greedy non-maximum merging, exact, with tensor operations instead of a loop over boxes.

    Greedy NMM visits boxes by descending score; an unvisited box becomes a group leader and every
    unvisited box matching it (IoS > ``threshold``, same label unless ``agnostic``) joins its group.
    The leaders are what greedy NMS on the match graph keeps. They are found in rounds over the
    graph's edges (a box that no surviving better box matches is a leader; the boxes a leader
    matches are settled): a handful of rounds for real detections rather than one step per box.
    Each box joins the first leader matching it; a group becomes the union box with the leader's
    score and label. ``extend`` (``[K]`` bool, default all) says which members may grow their group's
    box; the others are only suppressed, as by NMS. Returns the leaders by descending score.
    """
    n = len(boxes)
    if n == 0:
        return boxes, scores, labels
    order = scores.argsort(descending=True, stable=True)
    b, s, lab = boxes[order], scores[order], labels[order]
    head, tail = _match_edges(b, torch.zeros_like(lab) if agnostic else lab, threshold)  # head ranks first
    leader = torch.zeros(n, dtype=torch.bool)
    open_ = torch.ones(n, dtype=torch.bool)
    while bool(open_.any()):
        blocked = torch.zeros(n, dtype=torch.bool)
        blocked[tail[(leader | open_)[head]]] = True
        new = open_ & ~blocked
        leader |= new
        settled = torch.zeros(n, dtype=torch.bool)
        settled[tail[new[head]]] = True
        open_ &= ~new & ~settled
    joins = leader[head] & ~leader[tail]
    owner = torch.full((n,), n, dtype=torch.long).scatter_reduce(0, tail[joins], head[joins], reduce="amin")
    owner = torch.where(leader, torch.arange(n), owner)  # first (best) leader matching each member
    if extend is not None:  # members that may not grow a box go to a spare row n
        owner = torch.where(leader | extend[order], owner, n)
    merged = torch.cat((b, b[:1]))
    for k, reduce in enumerate(("amin", "amin", "amax", "amax")):
        merged[:, k] = merged[:, k].scatter_reduce(0, owner, b[:, k], reduce=reduce, include_self=True)
    return merged[:n][leader], s[leader], lab[leader]


def merge_detections(
    boxes: Tensor, scores: Tensor, labels: Tensor, cut: Tensor, options: InferenceOptions
) -> tuple[Tensor, Tensor, Tensor]:
    """Shifted tile (and full-image) detections -> one set: cut duplicates dropped, then NMS or NMM,
    then the best ``options.max_detections``."""
    sl = options.slicing
    assert sl is not None
    agnostic = options.class_agnostic
    keep = drop_cut_duplicates(boxes, labels, cut, sl.merge_threshold, agnostic)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if sl.merge == "nmm":
        # Only boxes cut by a tile border grow a merged box (the parts of one object); a whole box
        # matching a better one is dropped: a loose low-score box around several small objects would
        # otherwise swallow them (the threshold of 0.05 that COCO evaluation needs keeps such boxes).
        cut = cut[keep]
        boxes, scores, labels = greedy_nmm(boxes, scores, labels, sl.merge_threshold, agnostic, extend=cut)
    else:
        idx = batched_nms(boxes, scores, torch.zeros_like(labels) if agnostic else labels, sl.merge_threshold)
        boxes, scores, labels = boxes[idx], scores[idx], labels[idx]
    top = scores.argsort(descending=True, stable=True)[: options.max_detections]
    return boxes[top], scores[top], labels[top]


def predict_sliced(
    detector: Detector,
    image: np.ndarray,
    options: InferenceOptions,
    *,
    source: str = "<image>",
    batch_size: int | None = None,
) -> Detections:
    """Detections of one BGR uint8 ``[H, W, 3]`` image by tiles (see the module docstring).

    ``detector`` is a :class:`~atssdet.detector.Detector`; tiles go ``options.slicing.batch_size``
    (else ``batch_size``, else :data:`DEFAULT_TILE_BATCH`) per forward. A slice larger than the image
    raises :class:`~atssdet.errors.OptionError` naming ``source``.
    """
    assert options.slicing is not None
    sl = options.slicing
    h, w = image.shape[:2]
    try:
        windows = tile_windows(h, w, sl.size, sl.overlap)
    except OptionError as exc:
        raise OptionError(f"{source}: {exc}") from None
    per_forward = sl.batch_size or batch_size or DEFAULT_TILE_BATCH
    tile_opts = dataclasses.replace(options, slicing=None)
    crops = [image[y1:y2, x1:x2] for x1, y1, x2, y2 in windows.tolist()]  # views, one per tile
    resized = [resize_shortest_edge(c, detector.short_size, detector.max_size) for c in crops]
    results: list[Detections] = []
    for start in range(0, len(resized), per_forward):
        chunk = resized[start : start + per_forward]
        names = [f"{source} tile {i}" for i in range(start, start + len(chunk))]
        results += detector.detect_resized(
            chunk, [(sl.size, sl.size)] * len(chunk), options=tile_opts, sources=names
        )
    if sl.full_image:
        full = resize_shortest_edge(image, detector.short_size, detector.max_size)
        results += detector.detect_resized([full], [(h, w)], options=tile_opts, sources=[source])
        windows = torch.cat((windows, torch.tensor([[0, 0, w, h]])))
    failed = next((r for r in results if r.error is not None), None)
    if failed is not None:
        return error_result(source, str(failed.error), detector.cfg.class_names)
    counts = torch.tensor([len(r) for r in results])
    wins = windows.repeat_interleave(counts, dim=0)
    origin = torch.cat((wins[:, :2], wins[:, :2]), dim=1).to(torch.float32)
    boxes = torch.cat([r.boxes.reshape(-1, 4) for r in results]).to(torch.float32) + origin
    scores = torch.cat([r.scores for r in results])
    labels = torch.cat([r.labels for r in results])
    cut = cut_by_tile(boxes, wins, (h, w))
    boxes, scores, labels = merge_detections(boxes, scores, labels, cut, options)
    return Detections(
        boxes, scores, labels, class_names=detector.cfg.class_names, image_hw=(h, w), source=source
    )


def detect_sliced(
    detector: Detector,
    image: np.ndarray,
    options: InferenceOptions,
    *,
    source: str = "<image>",
    batch_size: int | None = None,
) -> Detections:
    """:func:`predict_sliced`, but a slice larger than the image gives an error result (batch jobs go on)."""
    try:
        return predict_sliced(detector, image, options, source=source, batch_size=batch_size)
    except OptionError as exc:
        return error_result(source, str(exc), detector.cfg.class_names)


def detect_sliced_many(
    detector: Detector, images: list[np.ndarray], options: InferenceOptions, sources: list[str] | None
) -> list[Detections]:
    """:func:`detect_sliced` on each image (evaluation's batches); ``sources`` default ``"<image i>"``."""
    names = sources or [f"<image {i}>" for i in range(len(images))]
    return [detect_sliced(detector, im, options, source=n) for im, n in zip(images, names, strict=True)]


def iter_predict_sliced(
    detector: Detector,
    images: Iterable[ImageInput],
    options: InferenceOptions,
    *,
    batch_size: int | None = None,
    keep_images: bool = False,
) -> Iterator[Detections]:
    """:meth:`Detector.iter_predict` with ``options.slicing``: one input at a time (its tiles batched);
    an unreadable input or a slice larger than it becomes an error result and the others go on."""
    names = detector.cfg.class_names
    for index, item in enumerate(images):
        # the original image is needed for the tiles whether or not the caller keeps it
        pending = prepare_input(index, item, detector.short_size, detector.max_size, True, names)
        if isinstance(pending, Detections):
            yield pending
            continue
        assert pending.image is not None
        result = detect_sliced(detector, pending.image, options, source=pending.source, batch_size=batch_size)
        result.image = pending.image if keep_images or isinstance(item, np.ndarray) else None
        yield result
