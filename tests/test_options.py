"""InferenceOptions and parse_classes: the one validation of test-time knobs."""

import math

import pytest

from atssdet.config import ATSSConfig
from atssdet.options import InferenceOptions, OptionError, parse_classes

NAMES = ("person", "bicycle", "car", "Dog")


def test_defaults_are_megengine_and_from_config_maps_test_names():
    assert InferenceOptions() == InferenceOptions(0.05, 0.6, 100, False, None, False)
    cfg = ATSSConfig(test_cls_threshold=0.2, test_nms=0.5, test_max_boxes_per_image=7)
    opts = InferenceOptions.from_config(cfg, max_detections=None, flip_tta=True)
    assert (opts.score_threshold, opts.nms_threshold, opts.max_detections, opts.flip_tta) == (
        0.2,
        0.5,
        7,
        True,
    )


@pytest.mark.parametrize(
    "changes",
    [
        {"score_threshold": 2},
        {"score_threshold": math.nan},
        {"score_threshold": -0.1},
        {"nms_threshold": math.nan},
        {"nms_threshold": math.inf},
        {"score_threshold": "0.5"},
        {"max_detections": -5},
        {"max_detections": 0},
        {"max_detections": 2.5},
        {"max_detections": True},
        {"classes": (-1,)},
        {"flip_tta": 1},
    ],
)
def test_out_of_range_values_are_refused_naming_the_option(changes):
    name = next(iter(changes))
    with pytest.raises(OptionError, match=name):
        InferenceOptions().replace(**changes)


def test_replace_ignores_none_and_refuses_unknown_names():
    opts = InferenceOptions(score_threshold=0.3)
    assert opts.replace(score_threshold=None) is opts
    with pytest.raises(OptionError, match="score_thresh"):
        opts.replace(score_thresh=0.1)
    assert opts.to_dict()["score_threshold"] == 0.3


def test_parse_classes_ids_names_and_errors():
    assert parse_classes("car, 0", NAMES) == (0, 2)
    assert parse_classes(["dog", 1, "DOG"], NAMES) == (1, 3)
    assert parse_classes(" , ", NAMES) is None
    assert parse_classes(None, NAMES) is None
    for bad, match in (
        ("cat", "unknown class name"),
        ("7", "out of range"),
        ("\u00b2", "unknown"),
        ([-1], "out of range"),
    ):
        with pytest.raises(OptionError, match=match):
            parse_classes(bad, NAMES)
