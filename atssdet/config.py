"""Model and training configuration.

Field names follow MegEngine's ``ATSSConfig`` (models/atss.py in MegEngine/Models) so that a user
of the seed recognises every knob; MegEngine fields that nothing here reads are left out
(:data:`REMOVED_FIELDS`). Configs are frozen dataclasses; derive variants with
:func:`dataclasses.replace` or :func:`with_overrides`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from atssdet import validate
from atssdet.validate import MAX_IMAGE_SIDE

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# The synthetic shapes dataset (atssdet.data.synth); category ids 1..6 in this order.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "rectangle", "triangle", "star", "ring", "cross")

# (low, high) for every integer field that sizes memory (an image side, a channel or class count, a
# box count); tuple fields apply them to each entry. Checked in ATSSConfig.__post_init__ (with
# atssdet.validate, whose MAX_IMAGE_SIDE also bounds --short-size/--max-size): sizes arrive from files
# a user did not write (checkpoint and ONNX metadata), so every config built is checked.
SIZE_BOUNDS: dict[str, tuple[int, int]] = {
    "backbone_freeze_at": (0, 5),
    "fpn_in_channels": (1, 8192),
    "fpn_out_channels": (1, 4096),
    "fpn_top_in_channel": (1, 4096),
    "num_classes": (1, 10000),
    "stride": (1, 1024),
    "head_num_convs": (0, 16),
    "head_norm_groups": (1, 4096),
    "anchor_topk": (1, 1000),
    "train_image_short_size": (1, MAX_IMAGE_SIDE),
    "train_image_max_size": (1, MAX_IMAGE_SIDE),
    "test_image_short_size": (1, MAX_IMAGE_SIDE),
    "test_image_max_size": (1, MAX_IMAGE_SIDE),
    "test_max_boxes_per_image": (1, 100000),
}

# ATSSConfig.numerics: PyTorch's fast arithmetic or MegEngine's (see the field's comment).
NUMERICS: tuple[str, ...] = ("torch", "megengine")

# Output channels of res3, res4, res5 for each backbone.
BACKBONE_CHANNELS: dict[str, tuple[int, int, int]] = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
    "resnext101_32x8d": (512, 1024, 2048),
    "resnet18_w32": (64, 128, 256),
    "resnet18_w16": (32, 64, 128),
}


@dataclass(frozen=True)
class ATSSConfig:
    """Everything that defines an ATSS model and its training recipe (MegEngine field names)."""

    backbone: str = "resnet50"
    backbone_norm: str = "FrozenBN"  # "FrozenBN" | "BN" | "SyncBN" | "GN"
    backbone_freeze_at: int = 2  # 0: nothing frozen, 1: stem, 2: stem + layer1, ...

    fpn_in_channels: tuple[int, ...] = (512, 1024, 2048)
    fpn_out_channels: int = 256
    fpn_top_in_channel: int = 256

    num_classes: int = 80
    class_names: tuple[str, ...] = COCO_CLASSES
    img_mean: tuple[float, float, float] = (103.530, 116.280, 123.675)  # BGR
    img_std: tuple[float, float, float] = (57.375, 57.120, 58.395)  # BGR
    stride: tuple[int, ...] = (8, 16, 32, 64, 128)
    head_num_convs: int = 4
    head_norm_groups: int = 32
    # "torch": the fast PyTorch path (at inference: one-pass FrozenBN, NHWC activations on CPU).
    # "megengine": compute as MegEngine does where it shows in the results: the head GroupNorm rounds
    # as MegEngine's CPU kernel (sequential float32 sums, computed with NumPy on the CPU; slower),
    # FrozenBN multiplies then adds, activations stay NCHW. Outputs and the train step come ~10x
    # closer to MegEngine's numbers. See docs/training-losses.md ("Numerics").
    numerics: str = "torch"

    anchor_offset: float = 0.5
    anchor_scale: int = 8
    anchor_topk: int = 9
    cls_prior_prob: float = 0.01

    focal_loss_alpha: float = 0.25
    focal_loss_gamma: float = 2.0
    iou_loss_type: str = "giou"
    loss_bbox_weight: float = 2.0

    train_image_short_size: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    train_image_max_size: int = 1333
    basic_lr: float = 0.01 / 16  # per image
    optimizer: str = "SGD"  # "SGD" (MegEngine recipe) | "AdamW" (atssdet demo preset)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    log_interval: int = 20
    nr_images_epoch: int = 80000
    max_epoch: int = 54
    warm_iters: int = 500
    lr_decay_rate: float = 0.1
    lr_decay_stages: tuple[int, ...] = (42, 50)
    lr_schedule: str = "step"  # "step" (MegEngine: decay at lr_decay_stages) | "cosine" (demo)

    test_image_short_size: int = 800
    test_image_max_size: int = 1333
    test_max_boxes_per_image: int = 100
    test_vis_threshold: float = 0.3
    test_cls_threshold: float = 0.05
    test_nms: float = 0.6

    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for name, (low, high) in SIZE_BOUNDS.items():
            validate.integers_in(name, getattr(self, name), low, high)
        validate.learning_rate("basic_lr", self.basic_lr)
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but num_classes is {self.num_classes}"
            )
        if len(self.stride) != 5:  # the FPN always has the five levels P3..P7
            raise ValueError(f"stride needs one value per FPN level P3..P7 (5), got {self.stride!r}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}; got {self.numerics!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ATSSConfig:
        """Read a config saved by :meth:`to_json` (checkpoint or export metadata), also by an older atssdet:
        fields in :data:`REMOVED_FIELDS` are dropped; any other unknown name raises ValueError."""
        try:
            raw = json.loads(text)
        except RecursionError:
            raise ValueError("a saved ATSSConfig is nested too deeply to be a config") from None
        if not isinstance(raw, dict):
            raise ValueError(f"a saved ATSSConfig is a JSON object, got {type(raw).__name__}")
        return cls.from_dict({k: v for k, v in raw.items() if k not in REMOVED_FIELDS})

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ATSSConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(names))
        if unknown:
            raise ValueError(f"unknown ATSSConfig field(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**kwargs)


# MegEngine ATSSConfig fields that nothing in atssdet read, removed so that ``--set`` of one is refused.
# Files written by older atssdet versions (training checkpoints, .safetensors and .onnx metadata) still
# carry them: :meth:`ATSSConfig.from_json` drops them so those files keep loading.
REMOVED_FIELDS: frozenset[str] = frozenset(
    {
        "backbone_pretrained",
        "fpn_in_features",
        "fpn_in_strides",
        "fpn_top_in_feature",
        "in_features",
        "num_anchors",
        "class_aware_box",
    }
)

# Fields that change neither the trained model, the data pipeline nor the recipe: logging, test-time
# settings and the arithmetic mode. A resumed run may change them (see :func:`training_differences`).
RUN_SETTING_FIELDS: frozenset[str] = frozenset(
    {
        "log_interval",
        "numerics",
        "test_image_short_size",
        "test_image_max_size",
        "test_max_boxes_per_image",
        "test_vis_threshold",
        "test_cls_threshold",
        "test_nms",
        "extra",
    }
)


def training_differences(saved: ATSSConfig, now: ATSSConfig) -> list[str]:
    """``"field: checkpoint A, now B"`` for every field outside :data:`RUN_SETTING_FIELDS` that differs."""
    a, b = dataclasses.asdict(saved), dataclasses.asdict(now)
    return [
        f"{k}: checkpoint {a[k]!r}, now {b[k]!r}" for k in a if k not in RUN_SETTING_FIELDS and a[k] != b[k]
    ]


def with_overrides(cfg: ATSSConfig, overrides: dict[str, Any]) -> ATSSConfig:
    """Return ``cfg`` with fields replaced; lists become tuples, unknown names raise ValueError."""
    merged = dataclasses.asdict(cfg)
    for key, value in overrides.items():
        if key in merged:
            _check_override_type(key, value, merged[key])
    merged.update(overrides)
    return ATSSConfig.from_dict(merged)


def _check_override_type(key: str, value: Any, current: Any) -> None:
    """Raise ValueError if ``value`` cannot replace ``current`` (same kind: bool, int, number, str, list)."""
    if current is None:
        return
    if isinstance(current, bool):
        ok = isinstance(value, bool)
    elif isinstance(current, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(current, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif isinstance(current, str):
        ok = isinstance(value, str)
    elif isinstance(current, tuple | list):
        ok = isinstance(value, tuple | list)
    else:  # pragma: no cover - every field is one of the above
        ok = True
    if not ok:
        raise ValueError(
            f"{key}={value!r}: expected {type(current).__name__} like the current value {current!r}"
        )


def parse_set_option(text: str) -> tuple[str, Any]:
    """Parse one ``--set key=value`` item; the value is read as JSON when possible, else a string."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    names = {f.name for f in dataclasses.fields(ATSSConfig)}
    if key not in names:
        raise ValueError(f"--set {key}: no such config field (known: {', '.join(sorted(names))})")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise ValueError(f"--set {key}: value nested too deeply") from None
    return key, value


def _variant(backbone: str, **kwargs: Any) -> ATSSConfig:
    return ATSSConfig(backbone=backbone, fpn_in_channels=BACKBONE_CHANNELS[backbone], **kwargs)


# The five MegEngine zoo variants (``3x`` = 54 epochs with decay at 42 and 50; resx101 is ``2x``).
PRESETS: dict[str, ATSSConfig] = {
    "atss_res18_coco_3x_800size": _variant("resnet18"),
    "atss_res34_coco_3x_800size": _variant("resnet34"),
    "atss_res50_coco_3x_800size": _variant("resnet50"),
    "atss_res101_coco_3x_800size": _variant("resnet101"),
    "atss_resx101_coco_2x_800size": _variant("resnext101_32x8d", max_epoch=36, lr_decay_stages=(24, 32)),
}


# CPU-sized configs trained from scratch on the synthetic shapes dataset (``python -m atssdet demo``).
# Not zoo models (no pretrained checkpoint, not in PRESETS): a 16-wide ResNet-18 with trainable
# BatchNorm and nothing frozen, a 64-channel FPN, 2-conv head towers, 128-192 px inputs, AdamW with a
# cosine schedule, tested at 224 px. Schedule: max_epoch epochs of nr_images_epoch images (the demo
# generates that many training images). docs/demo.md has the measurements behind these choices.
DEMO_PRESETS: dict[str, ATSSConfig] = {
    "atss_demo_cpu": ATSSConfig(
        backbone="resnet18_w16",
        backbone_norm="BN",
        backbone_freeze_at=0,
        fpn_in_channels=BACKBONE_CHANNELS["resnet18_w16"],
        fpn_out_channels=64,
        fpn_top_in_channel=64,
        num_classes=len(SHAPE_CLASSES),
        class_names=SHAPE_CLASSES,
        head_num_convs=2,
        head_norm_groups=16,
        train_image_short_size=(128, 144, 160, 176, 192),
        train_image_max_size=288,
        optimizer="AdamW",
        basic_lr=5e-3 / 8,  # per image: 5e-3 at batch 8
        weight_decay=1e-4,
        lr_schedule="cosine",
        warm_iters=100,
        nr_images_epoch=2000,
        max_epoch=8,  # 2000 iterations at batch 8
        log_interval=50,
        # Testing above the training scale enlarges the many small objects: +0.11 mAP over 160 px.
        test_image_short_size=224,
        test_image_max_size=336,
    ),
}
