"""``atssdet eval``: COCO evaluation of one or several checkpoints (``torchrun`` shards the images)."""

from __future__ import annotations

import argparse
from typing import Any

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
from atssdet.cli.data import add_data_format_flag


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "eval",
        help="COCO evaluation of one or several checkpoints (torchrun for several GPUs/nodes)",
        description="Run a detector over a split (COCO JSON, YOLO, Pascal VOC or CVAT), write the COCO results "
        "JSON and a metrics JSON next to it, and print the 12 COCO bbox statistics and per-class AP; "
        "--analysis/--report add PR curves, a confusion matrix, the TIDE breakdown and an HTML page. Several checkpoints "
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
    p.add_argument(
        "--data",
        required=True,
        help="COCO annotation JSON of the split (with --images), a COCO root, a YOLO data.yaml or its folder, "
        "a VOC root or a CVAT XML",
    )
    p.add_argument(
        "--images",
        default=None,
        help="folder holding the split's images (needed for a COCO JSON; default: the dataset's own)",
    )
    add_data_format_flag(p)
    p.add_argument(
        "--split", default=None, help="split of a dataset root / data.yaml (default: val2017, val)"
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
    p.add_argument(
        "--analysis",
        metavar="DIR",
        default=None,
        help="also write error analysis files: per-class precision-recall curves, the confusion matrix "
        "(PNG + CSV), the TIDE breakdown (several checkpoints: DIR/<name>/)",
    )
    p.add_argument(
        "--report",
        metavar="PAGE",
        default=None,
        help="also write one self-contained HTML page (statistics, per-class AP, curves, matrix, TIDE, the "
        "20 images with the most errors drawn), e.g. runs/eval/index.html; {name} as in --out",
    )
    p.add_argument(
        "--analysis-threshold",
        dest="score_threshold",
        type=float,
        help="score from which detections count in the confusion matrix and the drawn images (default 0.3)",
    )
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.data.formats import resolve_split
    from atssdet.evaluation.checkpoints import evaluate_checkpoints
    from atssdet.evaluation.tables import format_per_class_table, format_stats, format_stats_table

    slicing = slice_options(args)  # bad values fail before any work
    _check_outputs(args)
    resolved = resolve_split(args.data, data_format=getattr(args, "data_format", None), split=args.split,
                             images=args.images, default_splits=("val2017", "val"))  # fmt: skip
    results = evaluate_checkpoints(
        args.weights,
        resolved.annotations,
        resolved.image_root,
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
    done = []
    for result in results:
        done.append(result)
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
    if (args.analysis or args.report) and distributed.is_main_process():
        _write_extras(args, done, resolved.annotations, resolved.image_root)
    return 0


def _write_extras(args: argparse.Namespace, results: list[Any], annotations: Any, image_root: str) -> None:
    """``--analysis`` / ``--report`` of every evaluated checkpoint (evaluation.extras)."""
    from atssdet.evaluation.coco import read_ground_truth
    from atssdet.evaluation.extras import extra_paths, write_extras

    gt = read_ground_truth(annotations)
    pairs = extra_paths([r.label for r in results], args.analysis, args.report)
    for result, (analysis_dir, page) in zip(results, pairs, strict=True):
        written = write_extras(
            result.report, gt, image_root, analysis_dir=analysis_dir, report_path=page, inputs=[args.data],
            overwrite=getattr(args, "overwrite", False), title=f"{result.label} on {args.data}",
            **given(args, "score_threshold"),
        )  # fmt: skip
        where = ", ".join(str(p) for p in (analysis_dir, page) if p is not None)
        print(f"wrote {len(written)} analysis file(s): {where}")


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
    if args.analysis or args.report:
        from atssdet.evaluation.extras import extra_paths, planned_outputs

        outputs += planned_outputs(extra_paths([label for label, _ in runs], args.analysis, args.report))
    inputs = [args.data, *(path for _, path in runs if path is not None)]
    OutputGuard(COMMAND, inputs=inputs, overwrite=getattr(args, "overwrite", False)).check(outputs)
