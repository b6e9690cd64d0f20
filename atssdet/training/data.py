"""The training split (COCO, YOLO, VOC or CVAT): checked once before anything else, read with the
recipe's augmentation."""

from __future__ import annotations

import dataclasses
import os
import sys

from atssdet import distributed
from atssdet.config import ATSSConfig
from atssdet.data.check import check_dataset
from atssdet.data.coco import COCODetection
from atssdet.data.formats import ForeignDataset
from atssdet.data.transforms import TrainTransform

DATA_CHECKS = ("full", "quick", "off")


def check_training_data(
    ann_file: str | os.PathLike[str] | ForeignDataset,
    image_dir: str | os.PathLike[str],
    *,
    mode: str,
    progress: bool,
) -> None:
    """:func:`atssdet.data.check.check_dataset` on rank 0 (``mode`` ``"full"`` decodes every image,
    ``"quick"`` checks that they exist, ``"off"`` skips it); every rank raises its fatal report alike."""
    if mode not in DATA_CHECKS:
        raise ValueError(f"data_check must be 'full', 'quick' or 'off', got {mode!r}")
    if mode == "off":
        return
    report = None
    if distributed.is_main_process():
        report = check_dataset(ann_file, image_dir, read_images=mode == "full", progress=progress)
        if report.ok and report.warnings:
            print(
                f"atssdet train: data check: {len(report.warnings)} kind(s) of warning in {ann_file}; "
                "`python -m atssdet data check` lists them",
                file=sys.stderr,
            )
    report = distributed.broadcast_object(report)
    assert report is not None
    report.raise_if_fatal()


def training_dataset(
    cfg: ATSSConfig, ann_file: str | os.PathLike[str] | ForeignDataset, image_dir: str | os.PathLike[str]
) -> tuple[COCODetection, ATSSConfig]:
    """The annotated images of the split with MegEngine's train transform (random short side, flip),
    and ``cfg`` with the split's classes (``num_classes``, ``class_names``). ``ann_file``: a COCO JSON,
    or a YOLO / VOC / CVAT split (:func:`atssdet.data.formats.resolve_split`), read into the same
    COCO structure, so the same images in the same order give the same batches."""
    source = (
        ann_file.coco(max_examples=1, warnings=False) if isinstance(ann_file, ForeignDataset) else ann_file
    )
    dataset = COCODetection(
        source,
        image_dir,
        remove_images_without_annotations=True,
        transform=TrainTransform(short_sizes=cfg.train_image_short_size, max_size=cfg.train_image_max_size),
    )
    world = distributed.get_world_size()
    if len(dataset) < world:
        raise ValueError(f"{ann_file}: {len(dataset)} annotated image(s), fewer than the {world} ranks")
    if (cfg.num_classes, cfg.class_names) != (dataset.num_classes, dataset.class_names):
        cfg = dataclasses.replace(cfg, num_classes=dataset.num_classes, class_names=dataset.class_names)
    return dataset, cfg
