"""torch.hub entry points, one per zoo model: ``torch.hub.load(repo, "atss_res50_coco_3x_800size", pretrained=True)``.

Each returns an :class:`atssdet.ATSS` in eval mode: ``model(images)`` takes raw float BGR 0-255
``[N, 3, H, W]`` and returns dense :class:`atssdet.ATSSOutput`; wrap it in
``atssdet.detector.Detector(model)`` for detections. ``compat=True`` returns the seed-compatible
:class:`atssdet.compat.CompatModel` instead (``model(image=, im_info=)`` as with MegEngine's hub).
``pretrained=True`` downloads the official MegEngine weights once (see ``atssdet.download``);
``weights=PATH`` loads a local checkpoint instead. ``numerics="megengine"`` makes the head GroupNorm
round as MegEngine's CPU kernel (closest to MegEngine's numbers; slower; see docs/inference.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

dependencies = ["torch", "torchvision", "numpy", "cv2", "safetensors", "tqdm"]


def _build(name: str, pretrained: bool, weights: str | None, compat: bool, numerics: str) -> nn.Module:
    """The one loader (:func:`atssdet.loader.load`); ``compat`` wraps it as :func:`atssdet.compat.hub_load` does."""
    from atssdet.compat import hub_load
    from atssdet.loader import load

    if compat:
        return hub_load(name, pretrained, weights, numerics=numerics)
    return load(name, weights=weights, pretrained=pretrained, overrides={"numerics": numerics})


def atss_res18_coco_3x_800size(
    pretrained: bool = False, weights: str | None = None, compat: bool = False, numerics: str = "torch"
) -> nn.Module:
    """ATSS ResNet-18 FPN, COCO 3x, 38.3 mAP: :class:`atssdet.ATSS` (``compat=True``: ``CompatModel``)."""
    return _build("atss_res18_coco_3x_800size", pretrained, weights, compat, numerics)


def atss_res34_coco_3x_800size(
    pretrained: bool = False, weights: str | None = None, compat: bool = False, numerics: str = "torch"
) -> nn.Module:
    """ATSS ResNet-34 FPN, COCO 3x, 41.5 mAP: :class:`atssdet.ATSS` (``compat=True``: ``CompatModel``)."""
    return _build("atss_res34_coco_3x_800size", pretrained, weights, compat, numerics)


def atss_res50_coco_3x_800size(
    pretrained: bool = False, weights: str | None = None, compat: bool = False, numerics: str = "torch"
) -> nn.Module:
    """ATSS ResNet-50 FPN, COCO 3x, 42.6 mAP: :class:`atssdet.ATSS` (``compat=True``: ``CompatModel``)."""
    return _build("atss_res50_coco_3x_800size", pretrained, weights, compat, numerics)


def atss_res101_coco_3x_800size(
    pretrained: bool = False, weights: str | None = None, compat: bool = False, numerics: str = "torch"
) -> nn.Module:
    """ATSS ResNet-101 FPN, COCO 3x, 44.7 mAP: :class:`atssdet.ATSS` (``compat=True``: ``CompatModel``)."""
    return _build("atss_res101_coco_3x_800size", pretrained, weights, compat, numerics)


def atss_resx101_coco_2x_800size(
    pretrained: bool = False, weights: str | None = None, compat: bool = False, numerics: str = "torch"
) -> nn.Module:
    """ATSS ResNeXt-101 32x8d FPN, COCO 2x, 45.6 mAP: :class:`atssdet.ATSS` (``compat=True``: ``CompatModel``)."""
    return _build("atss_resx101_coco_2x_800size", pretrained, weights, compat, numerics)
