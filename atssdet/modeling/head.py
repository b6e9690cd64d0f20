"""ATSS point head (MegEngine ``layers.PointHead``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from atssdet.config import NUMERICS
from atssdet.ops.norm import megengine_group_norm


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) that can round like MegEngine's CPU kernel.

    ``numerics="torch"`` is PyTorch's kernel; ``"megengine"`` is :func:`atssdet.ops.norm.megengine_group_norm`
    (sequential float32 sums on the CPU: slower, for bit-level parity with MegEngine's outputs).
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, *, numerics: str = "torch"
    ) -> None:
        super().__init__(num_groups, num_channels, eps)
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}; got {numerics!r}")
        self.numerics = numerics

    def forward(self, x: Tensor) -> Tensor:
        if self.numerics == "megengine":
            return megengine_group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", numerics={self.numerics}"


def _tower(channels: int, num_convs: int, norm_groups: int, numerics: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        norm = GroupNorm(norm_groups, channels, numerics=numerics)
        layers += [nn.Conv2d(channels, channels, 3, 1, 1), norm, nn.ReLU()]
    return nn.Sequential(*layers)


class PointHead(nn.Module):
    """Two towers of ``num_convs x (conv3x3 -> GroupNorm -> ReLU)`` shared across levels.

    ``cls_score`` runs on the cls tower; ``bbox_pred`` and ``ctrness`` both run on the box tower.
    ``scale_list`` holds one learnt scale per level: ``ltrb = relu(bbox_pred * scale_l) * stride_l``.
    ``numerics`` picks the GroupNorm kernel (:class:`GroupNorm`).
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
        numerics: str = "torch",
    ) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.cls_subnet = _tower(in_channels, num_convs, norm_groups, numerics)
        self.bbox_subnet = _tower(in_channels, num_convs, norm_groups, numerics)
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
