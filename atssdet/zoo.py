"""The MegEngine model zoo: five COCO-pretrained ATSS detectors, their weight URLs and published AP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atssdet.config import PRESETS, ATSSConfig
from atssdet.modeling.atss import ATSS, build_model

DEFAULT_URL_BASE = "https://data.megengine.org.cn/models/weights/"


@dataclass(frozen=True)
class ZooEntry:
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
    try:
        return ZOO[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(ZOO)}") from None


def load(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> ATSS:
    """Build zoo model ``name``; load ``weights`` (.pkl/.safetensors/.pt path) if given.

    ``pretrained=True`` fetches the official checkpoint into the cache (see :mod:`atssdet.download`).
    ``overrides`` replace config fields (e.g. ``{"numerics": "megengine"}``). The model is returned
    in eval mode.
    """
    from atssdet.config import with_overrides
    from atssdet.convert import load_weights

    entry = get_entry(name)
    model = build_model(with_overrides(entry.config, overrides) if overrides else entry.config)
    if weights is not None:
        load_weights(model, weights)
    elif pretrained:
        from atssdet.download import fetch_pretrained

        load_weights(model, fetch_pretrained(entry))
    return model.eval()


def load_model(
    *,
    weights: str | os.PathLike[str] | None = None,
    model_name: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> ATSS:
    """An ATSS model in eval mode from a zoo name and/or a weights file (what ``--model/--weights`` mean).

    A ``.safetensors`` written by atssdet carries its config (``model_name`` then only fills in for
    files without one); other formats (``.pkl``, ``.pt``) need ``model_name``. No ``weights`` means the
    zoo's pretrained checkpoint of ``model_name`` (downloaded). ``overrides`` replace config fields
    (e.g. ``{"test_image_short_size": 640}``).
    """
    from atssdet.config import with_overrides
    from atssdet.convert import load_weights, read_checkpoint_config
    from atssdet.modeling.atss import build_model

    cfg = read_checkpoint_config(weights) if weights is not None else None
    if cfg is None:
        if model_name is None:
            what = f"{weights}: carries no config" if weights is not None else "no --weights given"
            raise ValueError(f"{what}; name the model with --model (one of the zoo names)")
        cfg = get_entry(model_name).config
    if overrides:
        cfg = with_overrides(cfg, overrides)
    model = build_model(cfg)
    if weights is not None:
        load_weights(model, weights)
    else:
        from atssdet.download import fetch_pretrained

        assert model_name is not None
        load_weights(model, fetch_pretrained(get_entry(model_name)))
    return model.eval()
