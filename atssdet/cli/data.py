"""``atssdet data synth|check``: the synthetic shapes dataset and the dataset health check."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command, add_progress_flag, given


def add_parser(sub: SubParsers) -> None:
    p = sub.add_parser("data", help="dataset tools (synthetic data, ...)", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _add_synth(data_sub)
    _add_check(data_sub)


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
        help="health check of a COCO-format annotation file and its images",
        description="Report every problem of a COCO-format split (malformed entries, duplicate or unknown "
        "ids, bad boxes, missing/unreadable images, size mismatches, crowd-only and empty images) with "
        "counts and the first offending ids, plus the class balance. Exit status 1 if a fatal problem "
        "is found (training refuses such a dataset), 0 otherwise.",
    )
    p.add_argument("ann_file", metavar="ANN_JSON", help="COCO instances JSON")
    p.add_argument(
        "--images", default=None, help="image folder (file_name is relative to it); omitted: no file checks"
    )
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
    report = check_dataset(args.ann_file, args.images, **kwargs)
    print(report.format(**given(args, "max_examples")))
    if args.json:
        print(f"wrote {write_report_json(report, args.json, overwrite=overwrite)}")
    return 1 if report.fatal else 0
