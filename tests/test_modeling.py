"""Backbone facts kept in one place: ``config.BACKBONE_CHANNELS`` is what each ResNet really outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from atssdet.config import BACKBONE_CHANNELS
from atssdet.modeling.resnet import ResNet


@pytest.mark.parametrize("arch", sorted(BACKBONE_CHANNELS))
def test_backbone_channels_table_matches_the_networks(arch):
    with torch.device("meta"):  # shapes only: no memory, no weight initialisation cost
        net = ResNet(arch)
    out = tuple(
        [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        for stage in (net.layer2, net.layer3, net.layer4)
    )
    assert out == BACKBONE_CHANNELS[arch]


def test_every_backbone_has_a_channels_entry():
    with pytest.raises(ValueError, match="unknown backbone") as err:
        ResNet("resnet_nope")
    known = str(err.value).split("expected one of ")[1].split(", ")
    assert set(known) == set(BACKBONE_CHANNELS)
