"""The ATSS detector: backbone + FPN + point head, returning raw dense predictions."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from atssdet.config import ATSSConfig
from atssdet.modeling.fpn import FPNBackbone
from atssdet.modeling.head import PointHead
from atssdet.modeling.resnet import ResNet
from atssdet.ops.images import pad_to_multiple
from atssdet.ops.points import grid_points

SIZE_DIVISIBILITY = 32  # MegEngine pads every batch to a multiple of 32 (raw pixels, before normalising)


class ATSSOutput(NamedTuple):
    """Raw dense predictions for a batch; A points over all levels (p3 first, row-major per level).

    ``box_ltrb`` is already ``relu(bbox_pred * scale) * stride`` in (padded, resized) input pixels.
    """

    cls_logits: Tensor  # [N, A, C]
    box_ltrb: Tensor  # [N, A, 4]
    ctr_logits: Tensor  # [N, A]
    points: Tensor  # [A, 2] (x, y) in input pixels
    num_points_per_level: tuple[int, ...]  # L entries, summing to A


def flatten_levels(per_level: list[Tensor]) -> Tensor:
    """``[N, K, H_l, W_l]`` per level -> ``[N, sum(H_l * W_l), K]`` (NCHW -> NHWC, like MegEngine)."""
    n, k = per_level[0].shape[:2]
    return torch.cat([t.permute(0, 2, 3, 1).reshape(n, -1, k) for t in per_level], dim=1)


class ATSS(nn.Module):
    """ATSS detector. ``forward(images)`` takes raw float BGR 0-255 ``[N, 3, H, W]`` and returns :class:`ATSSOutput`.

    The batch is zero-padded to a multiple of 32 in raw pixel space and only then normalised, as in
    MegEngine. Losses (:func:`atssdet.criterion.atss_loss`) and detections
    (:func:`atssdet.postprocess.postprocess`) are separate functions of the output.

    ``forward`` traces (``torch.jit.trace``, ``torch.onnx.export``) with every size read from the
    input, so a graph traced at one size runs at any other, provided the example needs padding
    (:func:`~atssdet.ops.images.pad_to_multiple` decides at trace time whether to pad at all). ONNX
    export traces this forward and :func:`atssdet.postprocess.dense_scores_and_boxes`, not a copy.
    """

    pixel_mean: Tensor
    pixel_std: Tensor

    def __init__(self, cfg: ATSSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        bottom_up = ResNet(
            cfg.backbone, norm=cfg.backbone_norm, freeze_at=cfg.backbone_freeze_at, numerics=cfg.numerics
        )
        c3, c4, c5 = cfg.fpn_in_channels
        self.backbone = FPNBackbone(
            bottom_up, (c3, c4, c5), cfg.fpn_out_channels, top_in_channels=cfg.fpn_top_in_channel
        )
        self.head = PointHead(
            cfg.fpn_out_channels,
            cfg.num_classes,
            cfg.stride,
            num_convs=cfg.head_num_convs,
            norm_groups=cfg.head_norm_groups,
            prior_prob=cfg.cls_prior_prob,
            numerics=cfg.numerics,
        )
        # Not persistent: the checkpoint format has no such keys.
        self.register_buffer("pixel_mean", torch.tensor(cfg.img_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.img_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: Tensor) -> Tensor:
        """Pad raw pixels to /32 with zeros, then ``(x - mean) / std`` per BGR channel."""
        padded = pad_to_multiple(images, SIZE_DIVISIBILITY)
        return (padded - self.pixel_mean) / self.pixel_std

    def _use_nhwc(self, x: Tensor) -> bool:
        """Run on NHWC (channels_last) activations on CPU: oneDNN convolutions are faster there
        (ATSS-R50 inference at 800x1333 1.35x, the demo's train step 1.35x; benchmarks/bench_inference.py).
        Values equal up to float32 summation order (~1e-6). Not with ``numerics="megengine"`` (parity
        mode keeps MegEngine's NCHW), not while tracing for export."""
        return x.device.type == "cpu" and self.cfg.numerics == "torch" and not torch.jit.is_tracing()

    def forward(self, images: Tensor) -> ATSSOutput:
        x = self.normalize(images.float())
        if self._use_nhwc(x):
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)
        logits, offsets, ctrness = self.head(features)
        # No int(): while tracing, shape entries are traced values and the points must follow the
        # input size; int() would bake the example's sizes into the graph.
        feature_hw = [(f.shape[-2], f.shape[-1]) for f in features]
        points = torch.cat(
            grid_points(feature_hw, self.cfg.stride, offset=self.cfg.anchor_offset, device=x.device), dim=0
        )
        return ATSSOutput(
            cls_logits=flatten_levels(logits),
            box_ltrb=flatten_levels(offsets),
            ctr_logits=flatten_levels(ctrness).squeeze(-1),
            points=points,
            num_points_per_level=tuple(h * w for h, w in feature_hw),
        )


def build_model(cfg: ATSSConfig) -> ATSS:
    """Build an ATSS model with freshly initialised weights."""
    return ATSS(cfg)
