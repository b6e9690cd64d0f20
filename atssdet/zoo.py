"""The MegEngine model zoo: five COCO-pretrained ATSS detectors, their weight files, configs and AP.

This module only describes the models (no torch import, so the CLI can list them for ``--help``).
:mod:`atssdet.download` fetches their weights, :mod:`atssdet.convert` reads checkpoints and
:mod:`atssdet.loader` builds models from all three.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from atssdet.config import COCO_CLASSES, PRESETS, ATSSConfig

DEFAULT_URL_BASE = "https://data.megengine.org.cn/models/weights/"

# COCO category id of each of the 80 contiguous labels (the official ids run 1..90 with gaps).
COCO_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
)  # fmt: skip


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its name, official weight file, published AP and (via ``config``) its architecture."""

    name: str
    filename: str  # official weight file name under the URL base
    coco_map: float  # published COCO val2017 mAP@[.5:.95], in percent

    @property
    def url(self) -> str:
        return url_base() + self.filename

    @property
    def config(self) -> ATSSConfig:
        return PRESETS[self.name]


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry("atss_res18_coco_3x_800size", "atss_res18_coco_3x_800size_38dot3_58e249d5.pkl", 38.3),
        ZooEntry("atss_res34_coco_3x_800size", "atss_res34_coco_3x_800size_41dot5_ec16a67b.pkl", 41.5),
        ZooEntry("atss_res50_coco_3x_800size", "atss_res50_coco_3x_800size_42dot6_9a92ed8c.pkl", 42.6),
        ZooEntry("atss_res101_coco_3x_800size", "atss_res101_coco_3x_800size_44dot7_9181687e.pkl", 44.7),
        ZooEntry("atss_resx101_coco_2x_800size", "atss_resx101_coco_2x_800size_45dot6_b3a91b36.pkl", 45.6),
    )
}


def url_base() -> str:
    """Where zoo weights are fetched from; ``$ATSSDET_URL_BASE`` overrides it (mirrors, tests)."""
    base = os.environ.get("ATSSDET_URL_BASE", DEFAULT_URL_BASE)
    return base if base.endswith("/") else base + "/"


def cache_dir() -> Path:
    """``$ATSSDET_HOME`` or ``~/.cache/atssdet``."""
    return Path(os.environ.get("ATSSDET_HOME", Path.home() / ".cache" / "atssdet"))


def get_entry(name: str) -> ZooEntry:
    """The zoo entry ``name``; an unknown name raises ValueError listing the five."""
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(ZOO)}") from None


def coco_category_ids(class_names: Sequence[str]) -> Sequence[int]:
    """Category id of each label: the official COCO ids for the 80 COCO classes, else ``1..C``."""
    if tuple(class_names) == COCO_CLASSES:
        return COCO_CATEGORY_IDS
    return range(1, len(class_names) + 1)
