"""ATSSConfig: overrides of unknown or removed fields are refused, saved configs of older versions load,
and the one classification of fields a resumed run may change."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from atssdet.config import (
    PRESETS,
    REMOVED_FIELDS,
    RUN_SETTING_FIELDS,
    ATSSConfig,
    parse_set_option,
    training_differences,
    with_overrides,
)
from tests.conftest import R18

FIELDS = {f.name for f in dataclasses.fields(ATSSConfig)}


@pytest.mark.parametrize("name", sorted(REMOVED_FIELDS))
def test_set_of_a_removed_field_is_refused_naming_it(name: str) -> None:
    assert name not in FIELDS
    with pytest.raises(ValueError, match=f"--set {name}: no such config field"):
        parse_set_option(f"{name}=1")
    with pytest.raises(ValueError, match=f"unknown ATSSConfig field\\(s\\): {name}$"):
        with_overrides(PRESETS[R18], {name: 1})


def test_saved_config_with_removed_fields_loads() -> None:
    cfg = PRESETS[R18]
    old = json.loads(cfg.to_json())
    old.update({"fpn_top_in_feature": "p5", "fpn_in_features": ["res3", "res4", "res5"], "num_anchors": 1})
    old.update({"fpn_in_strides": [8, 16, 32], "in_features": ["p3", "p4", "p5", "p6", "p7"]})
    old.update({"backbone_pretrained": False, "class_aware_box": False})
    assert set(old) - FIELDS == REMOVED_FIELDS
    assert ATSSConfig.from_json(json.dumps(old)) == cfg
    old["no_such_field"] = 1
    with pytest.raises(ValueError, match="unknown ATSSConfig field\\(s\\): no_such_field"):
        ATSSConfig.from_json(json.dumps(old))


def test_safetensors_metadata_with_removed_fields_loads(tmp_path) -> None:
    from safetensors.torch import save_file

    from atssdet.convert import load_safetensors, read_checkpoint_config

    cfg = PRESETS[R18]
    old = {**json.loads(cfg.to_json()), "fpn_top_in_feature": "p5", "class_aware_box": False}
    path = tmp_path / "old.safetensors"
    save_file(
        {"x": torch.zeros(1)}, str(path), metadata={"format": "atssdet", "atssdet_config": json.dumps(old)}
    )
    assert read_checkpoint_config(path) == cfg
    assert load_safetensors(path)[1] == cfg


def test_training_differences_ignore_logging_test_time_and_numerics_fields() -> None:
    assert RUN_SETTING_FIELDS <= FIELDS
    assert {"log_interval", "numerics", "test_nms", "test_image_short_size"} <= RUN_SETTING_FIELDS
    cfg = PRESETS[R18]
    relaxed = with_overrides(cfg, {"log_interval": 5, "numerics": "megengine", "test_cls_threshold": 0.3})
    assert training_differences(cfg, relaxed) == []
    changed = with_overrides(relaxed, {"basic_lr": 0.02, "train_image_max_size": 1000})
    assert training_differences(cfg, changed) == [
        "train_image_max_size: checkpoint 1333, now 1000",
        "basic_lr: checkpoint 0.000625, now 0.02",
    ]


def test_stride_needs_five_levels() -> None:
    with pytest.raises(ValueError, match="one value per FPN level P3..P7"):
        with_overrides(PRESETS[R18], {"stride": [8, 16, 32]})
