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
    given,
    overrides,
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
    p.add_argument("--batch-size", type=int, help="images per forward pass (per process; default 1)")
    add_device_flag(p, "cpu, cuda, cuda:1 ... (default: cuda if available; per LOCAL_RANK under torchrun)")
    p.add_argument(
        "--workers", dest="num_workers", type=int, help="image reading threads per process (default 2)"
    )
    add_set_flag(p, "override a config field, e.g. test_image_short_size=640")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=None,
        help="seconds before a stuck collective fails (default 1800)",
    )
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.evaluation import evaluate
    from atssdet.evaluation.tables import (
        checkpoint_label,
        expand_checkpoints,
        format_per_class_table,
        format_stats,
        format_stats_table,
    )
    from atssdet.loader import load, load_runner

    if args.weights is None and args.model is None:
        raise ValueError("give --model NAME and/or --weights FILE...")
    changes = overrides(args)
    paths = (
        expand_checkpoints(args.weights, start_epoch=args.start_epoch, end_epoch=args.end_epoch)
        if args.weights
        else []
    )
    runs: list[tuple[str, str | None]] = [(checkpoint_label(p), str(p)) for p in paths] or [
        (args.model, None)
    ]
    if len(runs) > 1 and "{name}" not in args.out:
        raise ValueError(f"--out {args.out}: several checkpoints need a {{name}} placeholder in --out")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ValueError("several checkpoints share a file name; evaluate them in separate commands")

    timeout = {} if args.dist_timeout is None else {"timeout": args.dist_timeout}
    distributed.init_distributed(device=args.device, **timeout)
    device = distributed.resolve_device(args.device)
    main = distributed.is_main_process()
    rows = []
    try:
        for label, weights in runs:
            model: Any
            if weights is not None and weights.endswith(".onnx"):  # an exported file, run by ONNX Runtime
                from atssdet.detector import Detector

                model = Detector(load_runner(weights=weights, overrides=changes, device=device.type))
            else:
                model = load(
                    args.model, weights=weights, pretrained=weights is None, overrides=changes, device=device
                )
            if main:
                print(
                    f"== {label}: {weights or 'pretrained'} on {args.data} ({distributed.get_world_size()} process(es), {device})"
                )
            report = evaluate(
                model,
                args.data,
                args.images,
                device=device,
                out=args.out.replace("{name}", label),
                extra_metrics={"checkpoint": weights, "model": args.model, "name": label},
                **given(args, "batch_size", "num_workers", "progress"),
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
