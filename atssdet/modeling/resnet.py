"""ResNet / ResNeXt bottom-up backbones (torchvision blocks, MegEngine key names)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.resnet import ResNet as _TVResNet
from torchvision.ops import FrozenBatchNorm2d

_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int], int, int, int]] = {
    # name: (block, layers, groups, width_per_group, base_planes)
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64, 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64, 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64, 64),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], 32, 8, 64),
    # Narrow ResNet-18s for CPU training from scratch (the offline demo): stem and stage widths
    # base, 2 base, 4 base, 8 base instead of 64..512; same blocks and module names.
    "resnet18_w32": (BasicBlock, [2, 2, 2, 2], 1, 64, 32),
    "resnet18_w16": (BasicBlock, [2, 2, 2, 2], 1, 64, 16),
}


class FrozenBN(FrozenBatchNorm2d):
    """torchvision's ``FrozenBatchNorm2d`` (same buffers and keys): ``y = x * s + (b - rm * s)``,
    ``s = w / sqrt(rv + eps)``, as MegEngine computes it.

    With ``numerics="torch"`` it computes the same affine map in one pass (``torch.addcmul``, ~2x
    faster, values equal up to one rounding); with ``numerics="megengine"`` it keeps MegEngine's
    multiply-then-add.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, *, numerics: str = "torch") -> None:
        super().__init__(num_features, eps=eps)
        self.numerics = numerics

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        scale, bias = scale.reshape(1, -1, 1, 1), bias.reshape(1, -1, 1, 1)
        if self.numerics != "torch":
            return x * scale + bias
        return torch.addcmul(bias, x, scale)


def norm_layer_factory(norm: str, numerics: str = "torch") -> Callable[[int], nn.Module]:
    """Backbone norm: ``FrozenBN`` (eps 1e-5, as MegEngine), ``BN``, ``SyncBN`` (BN converted for DDP) or ``GN``."""
    if norm == "FrozenBN":
        return lambda c: FrozenBN(c, eps=1e-5, numerics=numerics)
    if norm in ("BN", "SyncBN"):
        return lambda c: nn.BatchNorm2d(c, eps=1e-5)
    if norm == "GN":
        return lambda c: nn.GroupNorm(32, c, eps=1e-5)
    raise ValueError(f"unknown backbone_norm {norm!r} (expected FrozenBN, BN, SyncBN or GN)")


class ResNet(_TVResNet):
    """torchvision ResNet without ``avgpool``/``fc``; ``forward`` returns ``res2..res5`` features."""

    def __init__(
        self, arch: str, *, norm: str = "FrozenBN", freeze_at: int = 2, numerics: str = "torch"
    ) -> None:
        if arch not in _ARCHS:
            raise ValueError(f"unknown backbone {arch!r}; expected one of {', '.join(_ARCHS)}")
        block, layers, groups, width, base = _ARCHS[arch]
        norm_layer = norm_layer_factory(norm, numerics)
        super().__init__(block, layers, groups=groups, width_per_group=width, norm_layer=norm_layer)
        del self.avgpool
        del self.fc
        if base != 64:
            self._rebuild_narrow(block, layers, base, norm_layer)
        self.freeze_at = freeze_at
        self._freeze(freeze_at)

    def _rebuild_narrow(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        base: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        """Replace stem and stages by ``base``-wide ones (torchvision builds them 64-wide; its init rules)."""
        self.inplanes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(base)
        self.layer1 = self._make_layer(block, base, layers[0])
        self.layer2 = self._make_layer(block, base * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], stride=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _freeze(self, freeze_at: int) -> None:
        # MegEngine's train.py leaves conv1 and layer1 out of the optimizer (backbone_freeze_at=2).
        stages: list[list[nn.Module]] = [[self.conv1, self.bn1], [self.layer1], [self.layer2], [self.layer3]]
        for stage in stages[:freeze_at]:
            for module in stage:
                for p in module.parameters():
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``[N, 3, H, W]`` normalised input -> ``{"stem", "res2", "res3", "res4", "res5"}``."""
        stem = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        res2 = self.layer1(stem)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        res5 = self.layer4(res4)
        return {"stem": stem, "res2": res2, "res3": res3, "res4": res4, "res5": res5}
