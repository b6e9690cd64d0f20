"""Batch composition that never changes results.

A convolutional detector's output near an image depends on how far the batch is padded beyond it
(the model pads to /32 with raw 0, but beyond that the convolutions see their own zero padding in
normalised space). To make batched inference give exactly the per-image results (and so MegEngine's
batch-1 numbers), images are grouped by their padded input size and each group runs as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from atssdet.modeling.atss import SIZE_DIVISIBILITY


def padded_size(h: int, w: int, multiple: int = SIZE_DIVISIBILITY) -> tuple[int, int]:
    """``(h, w)`` rounded up to multiples of ``multiple``."""
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple


def group_by_padded_size(
    image_hw: Sequence[tuple[int, int]], *, max_group: int | None = None, multiple: int = SIZE_DIVISIBILITY
) -> list[list[int]]:
    """Indices of images grouped by padded size (first-appearance order), groups capped at ``max_group``."""
    groups: dict[tuple[int, int], list[list[int]]] = {}
    order: list[list[int]] = []
    for i, (h, w) in enumerate(image_hw):
        key = padded_size(int(h), int(w), multiple)
        chunks = groups.setdefault(key, [])
        if not chunks or (max_group is not None and len(chunks[-1]) >= max_group):
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(i)
    return order
