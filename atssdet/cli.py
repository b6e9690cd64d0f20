"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import logging
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


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="detect objects in images; write drawn images and a JSON",
        description="Run a detector on image files, folders (their files, not recursive) or glob "
        "patterns, in batches. Writes one drawn image per input and predictions.json (or, with --coco, "
        "predictions_coco.json + images_coco.json) into --out. Unreadable files are reported and "
        "skipped; the exit status is non-zero only when no image succeeded.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or glob patterns")
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
        "--batch-size", type=int, default=4, metavar="N", help="images per forward pass (default: 4)"
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from atssdet.predict import Detector, predict_files

    # Unreadable files are reported once, below, rather than also by the library's warnings.
    logging.getLogger("atssdet.predict").setLevel(logging.ERROR)
    if args.weights is not None:
        detector = Detector.from_checkpoint(
            args.weights,
            model=args.model,
            device=args.device,
            short_size=args.short_size,
            max_size=args.max_size,
        )
    elif args.model is not None:
        detector = Detector.from_pretrained(
            args.model, device=args.device, short_size=args.short_size, max_size=args.max_size
        )
    else:
        raise ValueError("give --model NAME (official weights) or --weights FILE")
    if args.coco_annotations is not None and not args.coco:
        raise ValueError("--coco-annotations only makes sense with --coco")
    report = predict_files(
        args.paths,
        detector=detector,
        out_dir=args.out,
        batch_size=args.batch_size,
        score_threshold=args.score_threshold,
        nms_threshold=args.nms_threshold,
        max_detections=args.max_detections,
        class_agnostic=args.class_agnostic,
        classes=args.classes,
        flip_tta=args.flip_tta,
        draw=not args.no_draw,
        draw_threshold=args.draw_threshold,
        coco=args.coco,
        coco_annotations=args.coco_annotations,
        progress=not args.no_progress,
    )
    print(report.table())
    for _, reason in report.failed:  # each reason starts with the file name
        print(f"atssdet predict: skipped {reason}", file=sys.stderr)
    return 0 if report.num_ok > 0 else 1


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_predict(sub)
    _add_models(sub)
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
