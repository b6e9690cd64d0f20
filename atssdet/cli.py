"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from atssdet.zoo import ZOO


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a MegEngine .pkl checkpoint to safetensors",
        description="Read a MegEngine checkpoint with a restricted unpickler (no code runs), check every "
        "key and shape against the model, and write an atssdet .safetensors file.",
    )
    p.add_argument("src", help="MegEngine .pkl (or .pkl.gz) checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model the checkpoint belongs to")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from atssdet.convert import convert_checkpoint
    from atssdet.zoo import get_entry

    out = convert_checkpoint(args.src, args.dst, get_entry(args.model).config)
    print(f"wrote {out}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools (synthetic data, ...)", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _add_data_synth(data_sub)
    _add_data_check(data_sub)


def _add_data_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic COCO-format shapes dataset",
        description="Generate a deterministic COCO-format detection dataset of six shape classes "
        "(circle, rectangle, triangle, star, ring, cross) on textured backgrounds, with train and val "
        "splits. Skips the work when OUT already holds a complete dataset with the same parameters.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, required=True, help="number of training images")
    p.add_argument("--num-val", type=int, required=True, help="number of validation images")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (same seed -> identical files; default 0)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[256, 384],
        metavar="PX",
        help="image side in pixels: one value (square images) or MIN MAX (each side drawn from the range; "
        "default 256 384)",
    )
    p.add_argument(
        "--format",
        choices=("png", "jpg"),
        default="png",
        help="image file format (jpg: ~4x smaller; default png)",
    )
    p.add_argument("--force", action="store_true", help="replace a dataset generated with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_data_synth)


def _run_data_synth(args: argparse.Namespace) -> int:
    from atssdet.data.synth import generate_synthetic_dataset

    if len(args.image_size) not in (1, 2):
        raise ValueError(f"--image-size takes 1 or 2 values, got {len(args.image_size)}")
    lo, hi = args.image_size[0], args.image_size[-1]
    out = generate_synthetic_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        image_size=(lo, hi),
        image_format=args.format,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"train: {out.train_ann} (images in {out.train_images})")
    print(f"val:   {out.val_ann} (images in {out.val_images})")
    print(f"classes: {', '.join(out.class_names)}")
    return 0


def _add_data_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check",
        help="health check of a COCO-format annotation file and its images",
        description="Report every problem of a COCO-format split (malformed entries, duplicate or unknown "
        "ids, bad boxes, missing/unreadable images, size mismatches, crowd-only and empty images) with "
        "counts and the first offending ids, plus the class balance. Exit status 1 if a fatal problem "
        "is found (training refuses such a dataset), 0 otherwise.",
    )
    p.add_argument("ann_file", metavar="ANN_JSON", help="COCO instances JSON")
    p.add_argument("--images", help="image folder (file_name is relative to it); omitted: no file checks")
    p.add_argument("--json", metavar="REPORT", help="also write the report as JSON to this path")
    p.add_argument("--max-examples", type=int, default=5, help="offending entries shown per problem")
    p.add_argument("--no-images", action="store_true", help="only check that image files exist (no decoding)")
    p.add_argument("--workers", type=int, help="image reading threads (default min(8, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_data_check)


def _run_data_check(args: argparse.Namespace) -> int:
    from atssdet.data.check import check_dataset, write_report_json

    if args.max_examples < 0:
        raise ValueError(f"--max-examples must be >= 0, got {args.max_examples}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    report = check_dataset(
        args.ann_file,
        args.images,
        read_images=not args.no_images,
        num_workers=args.workers,
        progress=not args.no_progress,
        max_examples=args.max_examples,
    )
    print(report.format(max_examples=args.max_examples))
    if args.json:
        print(f"wrote {write_report_json(report, args.json)}")
    return 1 if report.fatal else 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO evaluation of one or several checkpoints (torchrun for several GPUs/nodes)",
        description="Run a detector over a COCO-format split, write the COCO results JSON and a metrics "
        "JSON next to it, and print the 12 COCO bbox statistics and per-class AP. Several checkpoints "
        "(files, globs, or an {epoch} pattern with --start-epoch/--end-epoch) are evaluated in turn and "
        "compared in a table. Under `torchrun --nproc_per_node=N -m atssdet eval ...` the images are "
        "sharded across the processes.",
    )
    p.add_argument("--model", help="zoo model name (needed for .pkl weights; alone: the pretrained weights)")
    p.add_argument(
        "--weights",
        nargs="+",
        metavar="FILE",
        help="checkpoint(s): paths, globs ('runs/r18/epoch_*.safetensors') or an {epoch} pattern",
    )
    p.add_argument("-se", "--start-epoch", type=int, help="first epoch for an {epoch} pattern in --weights")
    p.add_argument("-ee", "--end-epoch", type=int, help="last epoch (inclusive) for an {epoch} pattern")
    p.add_argument("--data", required=True, help="COCO annotation JSON of the split")
    p.add_argument(
        "--images", required=True, help="folder holding the split's images (file_name is relative to it)"
    )
    p.add_argument(
        "--out",
        help="results JSON path; {name} is replaced by the checkpoint name (default runs/eval/{name}.results.json)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (per process)")
    p.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; per LOCAL_RANK under torchrun)"
    )
    p.add_argument("--workers", type=int, default=2, help="image reading threads per process")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. test_image_short_size=640",
    )
    p.add_argument(
        "--dist-timeout", type=float, default=1800.0, help="seconds before a stuck collective fails"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.config import parse_set_option
    from atssdet.evaluate import (
        checkpoint_label,
        evaluate,
        expand_checkpoints,
        format_per_class_table,
        format_stats,
        format_stats_table,
        load_model,
    )

    if args.weights is None and args.model is None:
        raise ValueError("give --model NAME and/or --weights FILE...")
    overrides = dict(parse_set_option(item) for item in args.set)
    paths = (
        expand_checkpoints(args.weights, start_epoch=args.start_epoch, end_epoch=args.end_epoch)
        if args.weights
        else []
    )
    runs: list[tuple[str, str | None]] = [(checkpoint_label(p), str(p)) for p in paths] or [
        (args.model, None)
    ]
    out_template = args.out or "runs/eval/{name}.results.json"
    if len(runs) > 1 and "{name}" not in out_template:
        raise ValueError(f"--out {out_template}: several checkpoints need a {{name}} placeholder in --out")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ValueError("several checkpoints share a file name; evaluate them in separate commands")

    distributed.init_distributed(device=args.device, timeout=args.dist_timeout)
    device = distributed.resolve_device(args.device)
    main = distributed.is_main_process()
    rows = []
    try:
        for label, weights in runs:
            model = load_model(weights=weights, model_name=args.model, overrides=overrides).to(device)
            out = out_template.replace("{name}", label)
            if main:
                print(
                    f"== {label}: {weights or 'pretrained'} on {args.data} ({distributed.get_world_size()} process(es), {device})"
                )
            report = evaluate(
                model,
                args.data,
                args.images,
                batch_size=args.batch_size,
                device=device,
                out=out,
                num_workers=args.workers,
                progress=not args.no_progress,
                extra_metrics={"checkpoint": weights, "model": args.model, "name": label},
            )
            rows.append((label, report.stats))
            if main:
                print(format_stats(report.stats))
                print()
                print(format_per_class_table(report.per_class_ap))
                print()
                failed = (
                    f", {len(report.failed_images)} unreadable image(s) skipped"
                    if report.failed_images
                    else ""
                )
                print(f"{report.num_images} images, {report.num_detections} detections{failed}")
                print(f"wrote {report.results_path} and {report.metrics_path}")
        if main and len(rows) > 1:
            print()
            print(format_stats_table(rows))
    finally:
        distributed.cleanup()
    return 0


def _add_table(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "table",
        help="compare metrics/results files in a markdown table",
        description="Print the 12 COCO statistics (percent) of several files side by side, one row per "
        "file: atssdet metrics JSON files (written by `eval`), or COCO results JSON files with --data.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="*.metrics.json (or results JSON with --data)")
    p.add_argument("--data", help="COCO annotation JSON, to score results files")
    p.add_argument("--digits", type=int, default=1, help="decimals of the percentages")
    p.set_defaults(func=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    from atssdet.evaluate import checkpoint_label, format_stats_table, load_coco, load_metrics

    gt = load_coco(args.data) if args.data else None
    rows = [(checkpoint_label(f), load_metrics(f, gt=gt)) for f in args.files]
    print(format_stats_table(rows, digits=args.digits))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_data(sub)
    _add_eval(sub)
    _add_table(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atssdet.convert import CheckpointError

    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"atssdet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
