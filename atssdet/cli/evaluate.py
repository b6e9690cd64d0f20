"""``atssdet eval``: COCO evaluation of one or several checkpoints (``torchrun`` shards the images)."""

from __future__ import annotations

import argparse

from atssdet.cli.common import (
    SubParsers,
    add_command,
    add_device_flag,
    add_model_flags,
    add_progress_flag,
    add_set_flag,
    add_slice_flags,
    given,
    overrides,
    slice_options,
)


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "eval",
        help="COCO evaluation of one or several checkpoints (torchrun for several GPUs/nodes)",
        description="Run a detector over a COCO-format split, write the COCO results JSON and a metrics "
        "JSON next to it, and print the 12 COCO bbox statistics and per-class AP. Several checkpoints "
        "(files, globs, or an {epoch} pattern with --start-epoch/--end-epoch) are evaluated in turn and "
        "compared in a table. Under `torchrun --nproc_per_node=N -m atssdet eval ...` the images are "
        "sharded across the processes.",
    )
    add_model_flags(
        p,
        model_help="zoo model name (needed for .pkl weights; alone: the pretrained weights)",
        weights_help="checkpoint(s): paths, globs ('runs/r18/epoch_*.safetensors') or an {epoch} pattern; an "
        "exported .onnx file runs in ONNX Runtime",
        nargs="+",
        zoo_choices=False,
    )
    p.add_argument(
        "-se", "--start-epoch", type=int, default=None, help="first epoch for an {epoch} pattern in --weights"
    )
    p.add_argument(
        "-ee", "--end-epoch", type=int, default=None, help="last epoch (inclusive) for an {epoch} pattern"
    )
    p.add_argument("--data", required=True, help="COCO annotation JSON of the split")
    p.add_argument(
        "--images", required=True, help="folder holding the split's images (file_name is relative to it)"
    )
    p.add_argument(
        "--out",
        default="runs/eval/{name}.results.json",
        help="results JSON path; {name} is replaced by the checkpoint name (default %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing results/metrics files that eval did not write (never the inputs)",
    )
    p.add_argument("--batch-size", type=int, help="images per forward pass (per process; default 1)")
    add_device_flag(p, "cpu, cuda, cuda:1 ... (default: cuda if available; per LOCAL_RANK under torchrun)")
    p.add_argument(
        "--workers", dest="num_workers", type=int, help="image reading threads per process (default 2)"
    )
    add_set_flag(p, "override a config field, e.g. test_image_short_size=640")
    add_slice_flags(p)
    p.add_argument(
        "--dist-timeout", type=float, help="seconds before a stuck collective fails (default 1800)"
    )
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.evaluation.checkpoints import evaluate_checkpoints
    from atssdet.evaluation.tables import format_per_class_table, format_stats, format_stats_table

    slicing = slice_options(args)  # bad values fail before any work
    _check_outputs(args)
    results = evaluate_checkpoints(
        args.weights,
        args.data,
        args.images,
        model=args.model,
        out=args.out,
        overrides=overrides(args),
        device=args.device,
        start_epoch=args.start_epoch,
        end_epoch=args.end_epoch,
        **given(args, "batch_size", "num_workers", "progress", "dist_timeout"),
        slicing=slicing,
    )
    rows = []
    for result in results:
        report = result.report
        rows.append((result.label, report.stats))
        if not distributed.is_main_process():
            continue
        print(
            f"== {result.label}: {result.weights or 'pretrained'} on {args.data} ({result.world_size} process(es))"
        )
        print(format_stats(report.stats), format_per_class_table(report.per_class_ap), sep="\n\n", end="\n\n")
        failed = f", {len(report.failed_images)} unreadable image(s) skipped" if report.failed_images else ""
        print(f"{report.num_images} images, {report.num_detections} detections{failed}")
        print(f"wrote {report.results_path} and {report.metrics_path}")
    if len(rows) > 1 and distributed.is_main_process():
        print()
        print(format_stats_table(rows))
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, results/metrics paths that are inputs or files eval did not write."""
    from atssdet.evaluation.checkpoints import plan_checkpoints
    from atssdet.evaluation.report import COMMAND, metrics_path_for
    from atssdet.guard import OutputGuard

    runs = plan_checkpoints(
        args.weights, args.model, out=args.out, start_epoch=args.start_epoch, end_epoch=args.end_epoch
    )
    outputs = []
    for label, _ in runs:
        results = args.out.replace("{name}", label)
        outputs += [results, metrics_path_for(results)]
    inputs = [args.data, *(path for _, path in runs if path is not None)]
    OutputGuard(COMMAND, inputs=inputs, overwrite=getattr(args, "overwrite", False)).check(outputs)
