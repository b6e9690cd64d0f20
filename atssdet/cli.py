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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector on a COCO-format dataset (torchrun for several GPUs/nodes)",
        description="Train ATSS with the MegEngine recipe (SGD, lr 0.01/16 per image scaled by the global "
        "batch, linear warm-up, step decay) on any COCO-format dataset. Checkpoints are written atomically "
        "to --out (iter_XXXXXXXX.pt every --checkpoint-every iterations, last.pt, model_final.safetensors); "
        "--resume continues exactly. Under `torchrun --nproc_per_node=N -m atssdet train ...` it trains "
        "with DistributedDataParallel (NCCL on GPU, gloo on CPU).",
    )
    p.add_argument("--model", help="zoo model whose config to train (default atss_res50_coco_3x_800size)")
    p.add_argument(
        "--data",
        required=True,
        help="COCO annotation JSON (with --images) or a dataset root (annotations/instances_train*.json ...)",
    )
    p.add_argument("--images", help="image folder of --data when it is a JSON file")
    p.add_argument(
        "--split", default=None, help="split name inside a dataset root (default: train2017, train)"
    )
    p.add_argument(
        "--val-data", help="validation annotation JSON or dataset root (evaluated during training)"
    )
    p.add_argument("--val-images", help="image folder of --val-data when it is a JSON file")
    p.add_argument("--out", required=True, help="output folder (checkpoints, train_log.jsonl, final weights)")
    p.add_argument("--batch-size", type=int, default=2, help="images per process (default 2, as MegEngine)")
    p.add_argument("--max-iters", type=int, help="stop after N iterations (default: max_epoch epochs)")
    p.add_argument(
        "--resume", metavar="PATH|auto", help="checkpoint to continue from, or 'auto' (newest in --out)"
    )
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument(
        "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; per LOCAL_RANK under torchrun)"
    )
    p.add_argument(
        "--init-backbone", metavar="FILE", help="ImageNet ResNet weights: torchvision .pth or MegEngine .pkl"
    )
    p.add_argument(
        "--finetune",
        metavar="FILE",
        help="detector checkpoint (.pkl/.safetensors) to start from; classifier re-initialised",
    )
    p.add_argument(
        "--checkpoint-every", type=int, default=5000, help="iterations between checkpoints (default 5000)"
    )
    p.add_argument("--keep-checkpoints", type=int, help="keep only the newest N iter_*.pt files")
    p.add_argument(
        "--eval-every", type=int, default=0, help="validate every N iterations (0: at the end only)"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per process (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data stream")
    p.add_argument(
        "--log-every", type=int, help="JSONL log record every N iterations (default cfg.log_interval)"
    )
    p.add_argument(
        "--max-bad-images",
        type=int,
        default=100,
        help="stop after skipping more unreadable images (default 100)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. backbone=resnet18 or train_image_short_size=[512,544]",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        help="seconds before a stuck collective fails (default 1800)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line per --log-every)")
    p.set_defaults(func=_run_train)


def _train_split(data: str, images: str | None, split: str | None, *, flag: str) -> tuple[str, str]:
    from pathlib import Path

    from atssdet.data.coco import find_coco_split

    path = Path(data)
    if path.is_file():
        if images is None:
            raise ValueError(f"{flag} {data} is a JSON file: give its image folder too")
        return str(path), images
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {data}: no such file or folder")
    splits = [split] if split else (["train2017", "train"] if flag == "--data" else ["val2017", "val"])
    errors = []
    for name in splits:
        try:
            ann, image_dir = find_coco_split(path, name)
        except ValueError as exc:  # DatasetError
            errors.append(str(exc))
            continue
        return str(ann), str(image_dir)
    raise FileNotFoundError(f"{flag} {data}: no split found ({'; '.join(errors)})")


def _run_train(args: argparse.Namespace) -> int:
    from atssdet import distributed
    from atssdet.config import PRESETS, parse_set_option, with_overrides
    from atssdet.convert import read_checkpoint_config
    from atssdet.train import TrainingError, train

    overrides = dict(parse_set_option(item) for item in args.set)
    if args.model is not None:
        if args.model not in PRESETS:
            raise ValueError(f"unknown model {args.model!r}; available: {', '.join(PRESETS)}")
        cfg = PRESETS[args.model]
    elif args.finetune and (saved := read_checkpoint_config(args.finetune)) is not None:
        cfg = saved
    else:
        cfg = PRESETS["atss_res50_coco_3x_800size"]
    if "backbone" in overrides and "fpn_in_channels" not in overrides:
        from atssdet.config import BACKBONE_CHANNELS

        overrides["fpn_in_channels"] = list(BACKBONE_CHANNELS[str(overrides["backbone"])])
    cfg = with_overrides(cfg, overrides) if overrides else cfg
    train_ann, train_images = _train_split(args.data, args.images, args.split, flag="--data")
    val_ann = val_images = None
    if args.val_data:
        val_ann, val_images = _train_split(args.val_data, args.val_images, None, flag="--val-data")
    try:
        result = train(
            cfg,
            train_ann=train_ann,
            train_images=train_images,
            out_dir=args.out,
            val_ann=val_ann,
            val_images=val_images,
            batch_size=args.batch_size,
            max_iters=args.max_iters,
            resume=args.resume,
            amp=args.amp,
            device=args.device,
            init_backbone=args.init_backbone,
            finetune=args.finetune,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            eval_every=args.eval_every,
            num_workers=args.workers,
            seed=args.seed,
            log_every=args.log_every,
            progress=not args.no_progress,
            max_bad_images=args.max_bad_images,
            dist_timeout=args.dist_timeout,
        )
        if distributed.is_main_process():
            print(
                f"trained iterations {result.start_iteration}..{result.iteration}; last checkpoint {result.checkpoint}"
            )
            if result.weights is not None:
                print(f"final weights: {result.weights}")
    except (TrainingError, distributed.DistributedError) as exc:
        print(f"atssdet train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline demo: synthetic data, train a CPU-sized ATSS, evaluate, draw detections",
        description="Generate the synthetic shapes dataset (cached), train the atss_demo_cpu preset from "
        "scratch (reused when OUT already holds a model trained with the same config), evaluate COCO mAP on "
        "the val split, draw detections on held-out images and plot loss and mAP. Needs no network.",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/demo, or runs/demo-quick)")
    p.add_argument("--retrain", action="store_true", help="train again even if a matching model exists")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny dataset and a few iterations: checks the pipeline in seconds",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: idle cores minus one, at least 1; 1 on a 2-core machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from atssdet.demo import FULL_PLAN, QUICK_PLAN, run_demo

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    result = run_demo(
        out,
        plan=QUICK_PLAN if args.quick else FULL_PLAN,
        retrain=args.retrain,
        device=args.device,
        threads=args.threads,
        progress=not args.no_progress,
    )
    print(result.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_data(sub)
    _add_demo(sub)
    _add_eval(sub)
    _add_table(sub)
    _add_train(sub)
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
