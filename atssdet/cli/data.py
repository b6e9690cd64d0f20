"""``atssdet data synth|check|convert``: the synthetic shapes dataset, the health check, format conversion."""

from __future__ import annotations

import argparse
from typing import Any

from atssdet.cli.common import SubParsers, add_command, add_progress_flag, given


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("data", help="dataset tools (synthetic data, ...)", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _add_synth(data_sub)
    _add_check(data_sub)
    _add_convert(data_sub)


# atssdet.data.formats.FORMATS (not imported: --help is fast; tests/test_formats_labelstudio.py compares)
DATA_FORMATS = ("coco", "yolo", "voc", "cvat", "labelstudio")


def add_data_format_flag(p: argparse.ArgumentParser, flag: str = "--data-format") -> None:
    """``--data-format coco|yolo|voc|cvat|labelstudio`` (default: detected from the file name or folder layout)."""
    p.add_argument(
        flag,
        dest="data_format",
        choices=DATA_FORMATS,
        help="dataset format (default: detected: .json COCO, or Label Studio when it holds a task list; "
        "data.yaml YOLO, Annotations/ VOC, .xml CVAT)",
    )


def _add_synth(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "synth",
        help="write a synthetic COCO-format shapes dataset",
        description="Generate a deterministic COCO-format detection dataset of six shape classes "
        "(circle, rectangle, triangle, star, ring, cross) on textured backgrounds, with train and val "
        "splits. Skips the work when OUT already holds a complete dataset with the same parameters.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, required=True, help="number of training images")
    p.add_argument("--num-val", type=int, required=True, help="number of validation images")
    p.add_argument("--seed", type=int, help="random seed (same seed -> identical files; default 0)")
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="PX",
        help="image side in pixels: one value (square images) or MIN MAX (each side drawn from the range; "
        "default 256 384)",
    )
    p.add_argument(
        "--format",
        dest="image_format",
        choices=("png", "jpg"),
        help="image file format (jpg: ~4x smaller; default png)",
    )
    p.add_argument("--force", action="store_true", help="replace a dataset generated with other parameters")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing files that data synth did not write"
    )
    add_progress_flag(p)
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from atssdet.data.synth import generate_synthetic_dataset

    kwargs = given(args, "seed", "image_format", "force", "progress", "overwrite")
    if hasattr(args, "image_size"):
        if len(args.image_size) not in (1, 2):
            raise ValueError(f"--image-size takes 1 or 2 values, got {len(args.image_size)}")
        kwargs["image_size"] = (args.image_size[0], args.image_size[-1])
    out = generate_synthetic_dataset(args.out, num_train=args.num_train, num_val=args.num_val, **kwargs)
    print(f"train: {out.train_ann} (images in {out.train_images})")
    print(f"val:   {out.val_ann} (images in {out.val_images})")
    print(f"classes: {', '.join(out.class_names)}")
    return 0


def _add_check(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "check",
        help="health check of a dataset split (COCO JSON, YOLO, VOC, CVAT) and its images",
        description="Report every problem of a split (malformed entries or label lines, bad XML, class ids "
        "out of range, duplicate or unknown ids, bad boxes, missing/unreadable images, size mismatches, "
        "crowd-only and empty images) with counts and the first offending entries (file and line or "
        "element for YOLO/VOC/CVAT), plus the class balance. Exit status 1 if a fatal problem is found "
        "(training refuses such a dataset), 0 otherwise.",
    )
    p.add_argument(
        "ann_file",
        metavar="DATA",
        help="COCO instances JSON, YOLO data.yaml (or its folder), VOC root, CVAT XML, Label Studio JSON export",
    )
    p.add_argument(
        "--images",
        default=None,
        help="image folder (file_name is relative to it); omitted: no file checks for a COCO JSON, the "
        "dataset's own folder otherwise",
    )
    add_data_format_flag(p)
    p.add_argument("--split", default=None, help="split of a YOLO/VOC/COCO root (default: train)")
    p.add_argument(
        "--json", metavar="REPORT", default=None, help="also write the report as JSON to this path"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a --json file that data check did not write"
    )
    p.add_argument("--max-examples", type=int, help="offending entries shown per problem (default 5)")
    p.add_argument(
        "--no-images",
        dest="read_images",
        action="store_false",
        help="only check that image files exist (no decoding)",
    )
    p.add_argument(
        "--workers", dest="num_workers", type=int, help="image reading threads (default min(8, CPUs))"
    )
    add_progress_flag(p)
    p.set_defaults(func=_run_check)


def _run_check(args: argparse.Namespace) -> int:
    from atssdet.data.check import check_dataset, report_guard, write_report_json

    kwargs = given(args, "read_images", "num_workers", "progress", "max_examples")
    if kwargs.get("max_examples", 0) < 0:
        raise ValueError(f"--max-examples must be >= 0, got {args.max_examples}")
    if kwargs.get("num_workers", 1) < 1:
        raise ValueError(f"--workers must be >= 1, got {args.num_workers}")
    overwrite = getattr(args, "overwrite", False)
    if args.json:  # refused before the check runs
        report_guard(args.ann_file, overwrite=overwrite).check([args.json])
    data, images = _check_input(args, kwargs.get("max_examples", 5))
    report = check_dataset(data, images, **kwargs)
    print(report.format(**given(args, "max_examples")))
    if args.json:
        print(f"wrote {write_report_json(report, args.json, overwrite=overwrite)}")
    return 1 if report.fatal else 0


def _check_input(args: argparse.Namespace, max_examples: int) -> tuple[Any, str | None]:
    """(what check_dataset takes, image folder) of ``DATA``: a COCO JSON stays a path (``--images``
    optional); a COCO root, YOLO, VOC, CVAT or Label Studio dataset is resolved to its split."""
    from pathlib import Path

    from atssdet.data.formats import detect_format, resolve_split

    path, fmt = Path(args.ann_file), getattr(args, "data_format", None)
    if path.is_file() and path.suffix.lower() == ".json" and (fmt or detect_format(path)) == "coco":
        return args.ann_file, args.images
    resolved = resolve_split(args.ann_file, data_format=getattr(args, "data_format", None), split=args.split,
                             images=args.images, max_examples=max_examples)  # fmt: skip
    return resolved.annotations, resolved.image_root


def _add_convert(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "convert",
        help="convert a dataset between COCO, YOLO, Pascal VOC (and from CVAT)",
        description="Read every split of SRC (or --split), validate it as training would (a fatal problem "
        "stops before anything is written) and write it in the --to format under --out: COCO "
        "(annotations/instances_<split>.json, images/<split>/), YOLO (data.yaml, images/<split>/, "
        "labels/<split>/) or VOC (Annotations/, JPEGImages/, ImageSets/Main/<split>.txt, classes.txt). "
        "Images are hard-linked (copied where links are impossible). See docs/data-formats.md.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="dataset: COCO JSON or root, YOLO data.yaml or folder, VOC root, CVAT XML, Label Studio JSON",
    )
    add_data_format_flag(p, "--from")
    p.add_argument("--to", required=True, choices=("coco", "yolo", "voc"), help="output format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--images", default=None, help="image folder of SRC (a COCO JSON or CVAT XML)")
    p.add_argument("--split", default=None, help="convert only this split (names a COCO JSON / CVAT split)")
    p.add_argument("--overwrite", action="store_true", help="replace files that data convert did not write")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from atssdet.data.formats.convert import convert_dataset

    summary = convert_dataset(
        args.src, args.to, args.out, from_format=getattr(args, "data_format", None), images=args.images,
        split=args.split, overwrite=getattr(args, "overwrite", False),
    )  # fmt: skip
    for name, (images, boxes) in summary.splits.items():
        print(f"{name}: {images} images, {boxes} boxes")
    if summary.dropped_crowd:
        print(f"left out {summary.dropped_crowd} crowd/difficult box(es): YOLO has no such flag")
    print(f"wrote {summary.files} files under {summary.out}")
    return 0
