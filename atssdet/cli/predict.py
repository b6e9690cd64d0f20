"""``atssdet predict``: detect on images, videos, folders or globs; drawn outputs + JSON."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from atssdet.cli.common import (
    SubParsers,
    add_command,
    add_device_flag,
    add_model_flags,
    add_progress_flag,
    add_slice_flags,
    given,
    slice_options,
)

# Flags that become InferenceOptions fields (same names); --classes is parsed against the model's names.
_OPTIONS = ("score_threshold", "nms_threshold", "max_detections", "class_agnostic", "flip_tta")


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
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
    add_model_flags(
        p,
        model_help="zoo model (official weights unless --weights)",
        weights_help="checkpoint (.safetensors alone; .pkl/.pkl.gz/.pt need --model to say the architecture)",
    )
    p.add_argument(
        "--out", default="runs/predict", metavar="DIR", help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files in --out that predict did not write (never the inputs)",
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
    add_slice_flags(p)
    p.add_argument("--track", metavar="NAME", help="videos: track objects across frames (bytetrack, botsort)")
    p.add_argument("--draw-threshold", type=float, metavar="T", help="draw boxes scoring >= T (default 0.3)")
    p.add_argument(
        "--no-draw", dest="draw", action="store_false", help="write only the JSON, no drawn images"
    )
    p.add_argument(
        "--coco",
        action="store_true",
        default=False,
        help="write COCO results JSON (pycocotools loadRes format)",
    )
    p.add_argument(
        "--coco-annotations",
        metavar="FILE",
        default=None,
        help="COCO annotation file giving image ids by file name (with --coco)",
    )
    p.add_argument("--short-size", type=int, metavar="S", help="test resize short side (config: 800)")
    p.add_argument("--max-size", type=int, metavar="S", help="test resize long-side cap (config: 1333)")
    add_device_flag(p)
    _add_scale_flags(p)
    p.add_argument(
        "--numerics",
        choices=["torch", "megengine"],
        help="megengine: round the head GroupNorm as MegEngine's CPU kernel (closest to MegEngine's "
        "numbers, slower: 1.87x on CPU for R50); default torch",
    )
    add_progress_flag(p)
    p.set_defaults(func=run)


def _add_scale_flags(p: argparse.ArgumentParser) -> None:
    """Streaming, workers, half precision and the Ray engine (docs/scale.md)."""
    p.add_argument(
        "--format",
        choices=["jsonl", "parquet"],
        help="stream format: a JSON line per image, flushed as it is done (default), or Parquet parts; "
        "a re-run into the same --out skips the images already recorded",
    )
    p.add_argument(
        "--save-format",
        choices=["yolo", "voc"],
        help="also write a label file per image: yolo (labels/NAME.txt with a score column, classes.txt) "
        "or voc (Annotations/NAME.xml)",
    )
    p.add_argument(
        "--workers", type=int, metavar="N", help="decode and resize in N worker processes (default 0: inline)"
    )
    p.add_argument(
        "--half", action="store_true", help="bf16 (else fp16) autocast on CUDA; refused on the CPU"
    )
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        help="local (default; under torchrun each rank takes its share) or ray: Ray Data actors "
        "(pip install 'atssdet[ray]'; no drawings)",
    )
    p.add_argument(
        "--ray-address", metavar="ADDR", help="Ray cluster to join (default: $RAY_ADDRESS or a local one)"
    )
    p.add_argument("--concurrency", type=int, metavar="K", help="Ray model actors (default 1)")
    p.add_argument("--num-gpus", type=float, metavar="G", help="GPUs per Ray model actor (default 0)")


def _scale_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``predict_files`` keyword arguments of the scale flags, checked before any model loads."""
    from atssdet import validate

    kwargs = given(args, "format", "workers", "engine", "save_format")
    if "workers" in kwargs:
        validate.count("workers", kwargs["workers"], minimum=0)
    ray_flags = given(args, "ray_address", "concurrency", "num_gpus")
    if kwargs.get("engine", "local") == "ray":
        from atssdet.ray_predict import RayOptions, require_ray

        require_ray()
        kwargs["ray"] = RayOptions(
            **{("address" if k == "ray_address" else k): v for k, v in ray_flags.items()}
        )
    elif ray_flags:
        raise ValueError(f"--{next(iter(ray_flags)).replace('_', '-')} only makes sense with --engine ray")
    return kwargs


def run(args: argparse.Namespace) -> int:
    from atssdet.options import InferenceOptions, parse_classes

    changes = given(args, *_OPTIONS)
    changes["slicing"] = slice_options(args)
    InferenceOptions(**changes)  # bad values fail here, before a model is loaded
    if hasattr(args, "track"):
        from atssdet.tracking import check_tracker

        check_tracker(args.track)
    from atssdet.detector import Detector
    from atssdet.predict import expand_inputs, predict_files
    from atssdet.video import VIDEO_SUFFIXES

    # Unreadable files are reported once, below, rather than also by the library's warnings.
    logging.getLogger("atssdet.detector").setLevel(logging.ERROR)
    if args.weights is None and args.model is None:
        raise ValueError("give --model NAME (official weights) or --weights FILE")
    if args.coco_annotations is not None and not args.coco:
        raise ValueError("--coco-annotations only makes sense with --coco")
    files, unexpanded = expand_inputs(args.paths)
    videos = [f for f in files if Path(f).suffix.lower() in VIDEO_SUFFIXES]
    if videos and args.coco:
        raise ValueError(f"--coco is for images; {videos[0]} is a video (videos write JSON lines per frame)")
    if hasattr(args, "track") and not videos:
        raise ValueError("--track is for videos; no video among the inputs")
    if videos and hasattr(args, "save_format"):
        raise ValueError(
            f"--save-format is for images; {videos[0]} is a video (videos write JSON lines per frame)"
        )
    scale = _scale_arguments(args)
    readable = _check_outputs(args, files, videos)  # before the model loads; unopenable videos are skipped
    loading = given(args, "device", "short_size", "max_size", "numerics")
    if getattr(args, "half", False):
        from atssdet.distributed import resolve_device

        if resolve_device(loading.get("device")).type != "cuda":
            raise ValueError("--half: half precision runs only on a CUDA device (on the CPU it is slower)")
    if args.weights is not None:
        detector = Detector.from_checkpoint(args.weights, model=args.model, **loading)
    else:
        detector = Detector.from_pretrained(args.model, **loading)
    if getattr(args, "half", False):
        detector.use_half()
    classes = parse_classes(getattr(args, "classes", None), detector.cfg.class_names)
    options: dict[str, Any] = {
        "detector": detector,
        "out_dir": args.out,
        "options": detector.options.replace(**changes, classes=classes),
        **given(args, "batch_size", "draw", "draw_threshold", "progress", "overwrite"),
    }
    done = _predict_videos(readable, {**options, **({"track": args.track} if hasattr(args, "track") else {})})
    if videos:
        for _, reason in unexpanded:
            print(f"atssdet predict: skipped {reason}", file=sys.stderr)
        images = [f for f in files if f not in set(videos)]
        if not images:
            return 0 if done else 1
    report = predict_files(
        images if videos else args.paths,
        coco=args.coco,
        coco_annotations=args.coco_annotations,
        **options,
        **scale,
    )
    if report.json_path is not None:  # under torchrun: rank 0, which wrote the final files
        print(report.table())
    for _, reason in report.failed:  # each reason starts with the file name
        print(f"atssdet predict: skipped {reason}", file=sys.stderr)
    if report.json_path is None:  # another rank than 0 under torchrun: rank 0's status counts
        return 0
    return 0 if report.num_ok + report.recorded + done > 0 else 1


def _check_outputs(args: argparse.Namespace, files: list[str], videos: list[str]) -> list[tuple[str, str]]:
    """Refuse (:class:`~atssdet.guard.OutputGuard`, one message for all) what this command must not
    write, before any work; returns ``(video, output name)`` for the videos that open (the others
    are reported and skipped)."""
    from atssdet.distributed import env_world_size
    from atssdet.guard import OutputGuard
    from atssdet.predict import COMMAND, plan_outputs
    from atssdet.video import output_names, plan_video

    draw = getattr(args, "draw", True)
    outputs: list[Path] = []
    readable: list[tuple[str, str]] = []
    for video, name in zip(videos, output_names(videos), strict=True):
        try:
            outputs += plan_video(video, args.out, draw=draw, name=name)
        except ValueError as exc:
            print(f"atssdet predict: skipped {exc}", file=sys.stderr)
            continue
        readable.append((video, name))
    images = [f for f in files if f not in set(videos)] if videos else args.paths
    plan = plan_outputs(
        images,
        out_dir=args.out,
        draw=draw and getattr(args, "engine", "local") == "local",
        coco=args.coco,
        coco_annotations=args.coco_annotations,
        format=getattr(args, "format", "jsonl"),
        save_format=getattr(args, "save_format", None),
        rank=(int(os.environ.get("RANK", "0")), env_world_size()),
    )
    if images or not videos:
        outputs += plan.outputs
    inputs = [*files, *plan.inputs, *([args.weights] if args.weights else [])]
    OutputGuard(COMMAND, inputs=inputs, overwrite=getattr(args, "overwrite", False)).check(outputs)
    return readable


def _predict_videos(videos: list[tuple[str, str]], options: dict[str, Any]) -> int:
    """:func:`atssdet.video.predict_video` on each ``(video, output name)`` (``options``: its keyword
    arguments); bad videos are reported and skipped. Returns how many worked."""
    from atssdet.video import predict_video

    done = 0
    for video, name in videos:
        try:
            result = predict_video(video, name=name, **options)
        except ValueError as exc:
            print(f"atssdet predict: skipped {exc}", file=sys.stderr)
            continue
        done += 1
        wrote = ", ".join(str(p) for p in (result.video_path, result.jsonl_path) if p is not None)
        print(
            f"{video}: {result.frames} frames at {result.fps:g} fps in {result.seconds:.1f} s; wrote {wrote}"
        )
    return done
