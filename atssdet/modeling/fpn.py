"""FPN with P6/P7 from P5 (MegEngine ``layers.FPN`` + ``LastLevelP6P7``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from atssdet.modeling.resnet import ResNet


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    # MegEngine's FPN initialisation (kaiming uniform with a=1, zero bias).
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class LastLevelP6P7(nn.Module):
    """``p6 = conv3x3/2(p5)``, ``p7 = conv3x3/2(relu(p6))``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        _c2_xavier_fill(self.p6)
        _c2_xavier_fill(self.p7)

    def forward(self, p5: Tensor) -> tuple[Tensor, Tensor]:
        p6 = self.p6(p5)
        p7 = self.p7(F.relu(p6))
        return p6, p7


class FPNBackbone(nn.Module):
    """Bottom-up ResNet plus FPN; ``forward`` returns ``[p3, p4, p5, p6, p7]``, each ``[N, 256, H_l, W_l]``.

    Attribute names (``bottom_up``, ``fpn_lateral3``, ``fpn_output3``, ``top_block.p6``...) mirror the
    checkpoint keys under ``backbone.``.
    """

    def __init__(
        self,
        bottom_up: ResNet,
        in_channels: tuple[int, int, int],
        out_channels: int = 256,
        *,
        top_in_channels: int | None = None,
    ) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        c3, c4, c5 = in_channels
        self.fpn_lateral3 = nn.Conv2d(c3, out_channels, 1)
        self.fpn_lateral4 = nn.Conv2d(c4, out_channels, 1)
        self.fpn_lateral5 = nn.Conv2d(c5, out_channels, 1)
        self.fpn_output3 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.fpn_output4 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.fpn_output5 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        for conv in (
            self.fpn_lateral3, self.fpn_lateral4, self.fpn_lateral5,
            self.fpn_output3, self.fpn_output4, self.fpn_output5,
        ):  # fmt: skip
            _c2_xavier_fill(conv)
        self.top_block = LastLevelP6P7(top_in_channels or out_channels, out_channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.bottom_up(x)
        return self.fpn(feats["res3"], feats["res4"], feats["res5"])

    def fpn(self, res3: Tensor, res4: Tensor, res5: Tensor) -> list[Tensor]:
        """Top-down pathway; upsampling is bilinear with align_corners=False (MegEngine), not nearest."""
        prev = self.fpn_lateral5(res5)
        p5 = self.fpn_output5(prev)
        prev = self.fpn_lateral4(res4) + F.interpolate(
            prev, size=res4.shape[-2:], mode="bilinear", align_corners=False
        )
        p4 = self.fpn_output4(prev)
        prev = self.fpn_lateral3(res3) + F.interpolate(
            prev, size=res3.shape[-2:], mode="bilinear", align_corners=False
        )
        p3 = self.fpn_output3(prev)
        p6, p7 = self.top_block(p5)
        return [p3, p4, p5, p6, p7]
