"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        help="checkpoint(s): paths, globs ('runs/r18/epoch_*.safetensors') or an {epoch} pattern; an "
        "exported .onnx file runs in ONNX Runtime",
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
    )
    from atssdet.zoo import load_model

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
            model: Any
            if weights is not None and weights.endswith(".onnx"):  # an exported file, run by ONNX Runtime
                from atssdet.predict import Detector

                if overrides:
                    raise ValueError(
                        f"{weights}: --set does not apply to an ONNX file (its config is baked in)"
                    )
                model = Detector.from_checkpoint(weights, device=device.type)
            else:
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (decoding, optionally NMS, inside the graph)",
        description="Export an ATSS model to ONNX. Inputs: images [N,3,H,W] float raw BGR 0-255, image_hw "
        "[N,2], orig_hw [N,2] (the graph pads to /32 and normalises). Outputs: scores [N,A,C] and boxes "
        "[N,A,4] in original pixels, or with --with-nms detections [N,K,6] and num_detections [N].",
    )
    p.add_argument("--model", choices=sorted(ZOO), help="zoo model (pretrained weights unless --weights)")
    p.add_argument(
        "--weights", help="checkpoint (.pkl/.pkl.gz/.safetensors/.pt); .safetensors carries its config"
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", required=True, help="output file, written atomically")
    p.add_argument(
        "--dynamic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="symbolic batch/height/width (default); --no-dynamic fixes batch 1 and --input-hw",
    )
    p.add_argument("--input-hw", type=int, nargs=2, metavar=("H", "W"), help="example/fixed input size")
    p.add_argument("--with-nms", action="store_true", help="put threshold, NMS and top-k in the graph")
    p.add_argument("--class-agnostic", action="store_true", help="NMS across classes (with --with-nms)")
    p.add_argument("--score-threshold", type=float, help="default: the config's test_cls_threshold")
    p.add_argument("--nms-threshold", type=float, help="default: the config's test_nms")
    p.add_argument("--max-detections", type=int, help="default: the config's test_max_boxes_per_image")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument(
        "--raw-input",
        action="store_true",
        help="input one uint8 image [H,W,3] BGR as read by cv2.imread; the graph resizes it (bit-exact "
        "cv2.INTER_LINEAR) and returns boxes in its pixels (--input-hw: the example image size)",
    )
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from atssdet.export import export_onnx, onnx_signature
    from atssdet.zoo import load_model

    if args.model is None and args.weights is None:
        raise ValueError("give --model NAME and/or --weights FILE")
    model = load_model(model_name=args.model, weights=args.weights)
    # Exported on CPU: the graph does not depend on the device it was traced on.
    example_hw = tuple(args.input_hw) if args.input_hw else ((213, 160) if args.dynamic else (800, 1333))
    out = export_onnx(
        model,
        args.out,
        dynamic=args.dynamic,
        with_nms=args.with_nms,
        opset=args.opset,
        score_threshold=args.score_threshold,
        nms_threshold=args.nms_threshold,
        max_detections=args.max_detections,
        class_agnostic=args.class_agnostic,
        example_hw=example_hw,
        model_name=args.model,
        raw_input=args.raw_input,
    )
    print(f"wrote {out}")
    print(onnx_signature(out))
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP (JSON API + browser page)",
        description="Serve a detector with FastAPI + uvicorn: POST /v1/detect (multipart image upload), "
        "GET /healthz, GET /v1/models, GET / (browser page), /openapi.json and /docs. Concurrent requests "
        "are batched on the device. See docs/serving.md.",
    )
    p.add_argument("--model", choices=sorted(ZOO), help="zoo model (alone: its pretrained weights)")
    p.add_argument(
        "--weights", help="checkpoint (.pkl/.safetensors/.pt); without --model an atssdet .safetensors"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests run together (default 8)")
    p.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a batch waits to fill (default 10 ms)"
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit (default 20 MB)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference setting, e.g. --set test_image_short_size=512 (test_* fields only)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from atssdet.serve import create_app, load_serving_model, run_server
    except ImportError as exc:
        raise ValueError(f"serving needs the 'serve' extra (pip install 'atssdet[serve]'): {exc}") from exc
    from atssdet.config import parse_set_option

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    overrides = dict(parse_set_option(item) for item in args.set)
    model, cfg, name = load_serving_model(
        model_name=args.model, weights=args.weights, device=args.device, overrides=overrides
    )
    app = create_app(
        model,
        model_name=name,
        cfg=cfg,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_upload_mb=args.max_upload_mb,
    )
    run_server(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="detect objects in images; write drawn images and a JSON",
        description="Run a detector on image files, folders (their files, not recursive) or glob "
        "patterns, in batches. Writes one drawn image per input and predictions.json (or, with --coco, "
        "predictions_coco.json + images_coco.json) into --out. Unreadable files are reported and "
        "skipped; the exit status is non-zero only when no image succeeded.",
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, video files (.mp4 .avi .mov .mkv ...: a drawn .mp4 and per-frame JSON lines), "
        "folders or glob patterns",
    )
    p.add_argument("--model", choices=sorted(ZOO), help="zoo model (official weights unless --weights)")
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="checkpoint (.safetensors alone; .pkl/.pkl.gz/.pt need --model to say the architecture)",
    )
    p.add_argument(
        "--out", default="runs/predict", metavar="DIR", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="images per forward pass (default: 1 on CPU, 4 on GPU)"
    )
    p.add_argument(
        "--score-threshold", type=float, metavar="T", help="keep detections scoring > T (config: 0.05)"
    )
    p.add_argument("--nms-threshold", type=float, metavar="T", help="NMS IoU threshold (config: 0.6)")
    p.add_argument("--max-detections", type=int, metavar="K", help="detections per image (config: 100)")
    p.add_argument("--class-agnostic", action="store_true", help="one NMS across all classes")
    p.add_argument("--classes", nargs="+", metavar="C", help="keep only these classes (names or 0-based ids)")
    p.add_argument(
        "--flip-tta", action="store_true", help="add a horizontally flipped pass (merged before NMS)"
    )
    p.add_argument("--draw-threshold", type=float, metavar="T", help="draw boxes scoring >= T (config: 0.3)")
    p.add_argument("--no-draw", action="store_true", help="write only the JSON, no drawn images")
    p.add_argument("--coco", action="store_true", help="write COCO results JSON (pycocotools loadRes format)")
    p.add_argument(
        "--coco-annotations",
        metavar="FILE",
        help="COCO annotation file giving image ids by file name (with --coco)",
    )
    p.add_argument("--short-size", type=int, metavar="S", help="test resize short side (config: 800)")
    p.add_argument("--max-size", type=int, metavar="S", help="test resize long-side cap (config: 1333)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--numerics",
        choices=["torch", "megengine"],
        help="megengine: round the head GroupNorm as MegEngine's CPU kernel (closest to MegEngine's "
        "numbers, slower: 1.87x on CPU for R50); default torch",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from atssdet.predict import VIDEO_SUFFIXES, Detector, expand_inputs, predict_files

    # Unreadable files are reported once, below, rather than also by the library's warnings.
    logging.getLogger("atssdet.predict").setLevel(logging.ERROR)
    if args.weights is not None:
        detector = Detector.from_checkpoint(
            args.weights,
            model=args.model,
            device=args.device,
            short_size=args.short_size,
            max_size=args.max_size,
            numerics=args.numerics,
        )
    elif args.model is not None:
        detector = Detector.from_pretrained(
            args.model,
            device=args.device,
            short_size=args.short_size,
            max_size=args.max_size,
            numerics=args.numerics,
        )
    else:
        raise ValueError("give --model NAME (official weights) or --weights FILE")
    if args.coco_annotations is not None and not args.coco:
        raise ValueError("--coco-annotations only makes sense with --coco")
    files, unexpanded = expand_inputs(args.paths)
    videos = [f for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES]
    if videos and args.coco:
        raise ValueError(f"--coco is for images; {videos[0]} is a video (videos write JSON lines per frame)")
    options: dict[str, Any] = {
        "detector": detector,
        "out_dir": args.out,
        "batch_size": args.batch_size,
        "score_threshold": args.score_threshold,
        "nms_threshold": args.nms_threshold,
        "max_detections": args.max_detections,
        "class_agnostic": args.class_agnostic,
        "classes": args.classes,
        "flip_tta": args.flip_tta,
        "draw": not args.no_draw,
        "draw_threshold": args.draw_threshold,
        "progress": not args.no_progress,
    }
    done = _predict_videos(videos, options)
    if videos:
        for _, reason in unexpanded:
            print(f"atssdet predict: skipped {reason}", file=sys.stderr)
        images = [f for f in files if f not in set(videos)]
        if not images:
            return 0 if done else 1
    report = predict_files(
        images if videos else args.paths, coco=args.coco, coco_annotations=args.coco_annotations, **options
    )
    print(report.table())
    for _, reason in report.failed:  # each reason starts with the file name
        print(f"atssdet predict: skipped {reason}", file=sys.stderr)
    return 0 if report.num_ok + done > 0 else 1


def _predict_videos(videos: list[str], options: dict[str, Any]) -> int:
    """:func:`atssdet.predict.predict_video` on each video (``options``: its keyword arguments); bad
    videos are reported and skipped. Returns how many worked."""
    from atssdet.predict import predict_video

    done = 0
    for video in videos:
        try:
            result = predict_video(video, **options)
        except ValueError as exc:
            print(f"atssdet predict: skipped {exc}", file=sys.stderr)
            continue
        done += 1
        wrote = ", ".join(str(p) for p in (result.video_path, result.jsonl_path) if p is not None)
        print(
            f"{video}: {result.frames} frames at {result.fps:g} fps in {result.seconds:.1f} s; wrote {wrote}"
        )
    return done


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the model zoo and what is cached",
        description="List the five zoo models with their COCO val2017 mAP and whether their weights are "
        "in the cache ($ATSSDET_HOME, default ~/.cache/atssdet).",
    )
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from atssdet.download import cache_status, converted_path, raw_path
    from atssdet.zoo import cache_dir

    rows = [("model", "backbone", "COCO mAP", "cached", "file")]
    for entry in ZOO.values():
        status = cache_status(entry)
        path = {"converted": converted_path(entry), "downloaded": raw_path(entry)}.get(status)
        label = {"converted": "yes", "downloaded": "pkl only (converted on first load)", "no": "no"}[status]
        rows.append((entry.name, entry.config.backbone, f"{entry.coco_map:.1f}", label, str(path or "-")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"cache: {cache_dir()}")
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
    p.add_argument(
        "--allow-layout-change",
        action="store_true",
        help="resume a checkpoint written with another processes x batch layout: continue at the same "
        "number of images seen, lr of the new global batch (data order then differs)",
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
    p.add_argument(
        "--data-check",
        choices=("full", "quick", "off"),
        default="full",
        help="dataset health check before training (`data check`): full decodes every image, quick checks "
        "the annotation file and that images exist; fatal problems stop training (default full)",
    )
    p.set_defaults(func=_run_train)


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
    from atssdet.config import BACKBONE_CHANNELS

    if "fpn_in_channels" not in overrides and str(overrides.get("backbone")) in BACKBONE_CHANNELS:
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
            data_check=args.data_check,
            dist_timeout=args.dist_timeout,
            allow_layout_change=args.allow_layout_change,
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
    _add_predict(sub)
    _add_models(sub)
    _add_data(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_eval(sub)
    _add_table(sub)
    _add_export(sub)
    _add_serve(sub)
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
