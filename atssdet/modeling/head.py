"""ATSS point head (MegEngine ``layers.PointHead``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _tower(channels: int, num_convs: int, norm_groups: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        layers += [nn.Conv2d(channels, channels, 3, 1, 1), nn.GroupNorm(norm_groups, channels), nn.ReLU()]
    return nn.Sequential(*layers)


class PointHead(nn.Module):
    """Two towers of ``num_convs x (conv3x3 -> GroupNorm -> ReLU)`` shared across levels.

    ``cls_score`` runs on the cls tower; ``bbox_pred`` and ``ctrness`` both run on the box tower.
    ``scale_list`` holds one learnt scale per level: ``ltrb = relu(bbox_pred * scale_l) * stride_l``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        strides: Sequence[int],
        *,
        num_convs: int = 4,
        norm_groups: int = 32,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.cls_subnet = _tower(in_channels, num_convs, norm_groups)
        self.bbox_subnet = _tower(in_channels, num_convs, norm_groups)
        self.cls_score = nn.Conv2d(in_channels, num_classes, 3, 1, 1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, 1, 1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, 1, 1)
        self.scale_list = nn.Parameter(torch.ones(len(self.strides)))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        assert self.cls_score.bias is not None
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: logits ``[N, C, H, W]``, ltrb ``[N, 4, H, W]`` (input pixels), ctrness logits ``[N, 1, H, W]``."""
        logits, offsets, ctrness = [], [], []
        for level, feature in enumerate(features):
            cls_tower = self.cls_subnet(feature)
            box_tower = self.bbox_subnet(feature)
            logits.append(self.cls_score(cls_tower))
            offsets.append(F.relu(self.bbox_pred(box_tower) * self.scale_list[level]) * self.strides[level])
            ctrness.append(self.ctrness(box_tower))
        return logits, offsets, ctrness
