"""Deployment table: backend (PyTorch, ONNX Runtime, OpenVINO) x precision (fp32, fp16, bf16, int8).

    python -m atssdet demo --out runs/demo                 # once: trains the demo model (about 10 min)
    python benchmarks/bench_deploy.py accuracy --demo runs/demo
    python benchmarks/bench_deploy.py speed [--repeats 3] [--batch 8]
    python benchmarks/bench_deploy.py all --demo runs/demo

accuracy: every row's COCO mAP of the demo model on the demo's val split (300 images), through the
same ``Detector`` + ``evaluate`` path as ``atssdet eval --weights FILE``. int8 rows calibrate on the
first --calibration-images images of the demo's *train* split (never on val). One extra row shows
the fp16 ONNX graph with nothing kept in float32 (what FP16_KEEP_OPS buys); ``--keep-float N`` adds
int8 rows with the N least robust layers (per-layer sensitivity pass) kept in float.

speed: ATSS-R50 (random weights) on an 800x1333 input, end to end (graph + select_detections):
median latency at batch 1 and throughput at batch 8, every row in the same run, round-robin
(``interleaved_medians``), with the ratio to PyTorch fp32. Threads: all cores for every backend.
Random weights score every (point, class) pair alike: with the head's prior bias each scores
sqrt(0.01 * 0.5) = 0.07 > 0.05, so all 1.8 M pairs of an 800x1333 image would go into NMS (about
75 s, the whole measurement). The class bias is therefore shifted so that --candidates pairs per
image pass the score threshold (``_calibrate_candidates``), and the cost of select_detections
alone at 10^2..10^4 candidates is printed beside the table. int8 rows calibrate on
--speed-calibration-images images (the demo's train split when there is one, else generated ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.detector import Detector  # noqa: E402
from atssdet.errors import OptionError  # noqa: E402
from atssdet.export_formats import export_model  # noqa: E402
from atssdet.loader import load  # noqa: E402
from atssdet.modeling.atss import build_model  # noqa: E402
from atssdet.options import InferenceOptions  # noqa: E402
from atssdet.postprocess import dense_scores_and_boxes, select_detections  # noqa: E402
from atssdet.zoo import get_entry  # noqa: E402
from benchmarks.common import interleaved_medians, machine_line  # noqa: E402

# (backend, precision) rows; OpenVINO's fp16 IR computes in f32 on x86 CPUs (fp16 weights only).
ROWS = (
    ("pytorch", "fp32"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "fp16"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "fp16"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
)
FORMAT = {"onnxruntime": ("onnx", ".onnx"), "openvino": ("openvino", ".xml")}


def _export(
    model, backend: str, precision: str, folder: Path, calibration: Path, images: int, keep: int
) -> Path:
    fmt, suffix = FORMAT[backend]
    name = f"{backend}_{precision}{f'_keep{keep}' if keep else ''}{suffix}"
    start = time.perf_counter()
    out = export_model(
        model,
        folder / name,
        format=fmt,
        precision=precision,
        calibration=calibration if precision == "int8" else None,
        calibration_images=images,
        keep_float=keep,
        report=lambda text: print(text, file=sys.stderr),
    )
    print(f"  exported {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


def _fp16_nothing_kept(model, folder: Path) -> Path:
    """The fp16 ONNX graph with only onnxruntime's default block list in float32 (the measurement
    behind FP16_KEEP_OPS)."""
    from atssdet import export_formats, export_quant

    saved = export_quant.FP16_KEEP_OPS
    export_formats.FP16_KEEP_OPS = ()  # type: ignore[assignment]
    try:
        return export_model(model, folder / "onnxruntime_fp16_all.onnx", precision="fp16")
    finally:
        export_formats.FP16_KEEP_OPS = saved  # type: ignore[assignment]


def accuracy(args: argparse.Namespace) -> None:
    from atssdet.evaluation.loop import evaluate

    demo = Path(args.demo)
    data = demo / "data"
    model = load(weights=demo / "model.safetensors")
    rows: list[tuple[str, Path | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for backend, precision in ROWS:
            if backend == "pytorch":
                rows.append(("pytorch fp32", None))
                continue
            path = _export(model, backend, precision, folder, data / "train", args.calibration_images, 0)
            rows.append((f"{backend} {precision}", path))
            if precision == "int8" and args.keep_float:
                path = _export(
                    model,
                    backend,
                    precision,
                    folder,
                    data / "train",
                    args.calibration_images,
                    args.keep_float,
                )
                rows.append((f"{backend} int8 keep-float {args.keep_float}", path))
        rows.append(("onnxruntime fp16, nothing kept fp32", _fp16_nothing_kept(model, folder)))
        results = {}
        for label, path in rows:
            detector = Detector(model, device="cpu") if path is None else Detector.from_checkpoint(path)
            start = time.perf_counter()
            report = evaluate(
                detector, data / "annotations" / "instances_val.json", data / "val", progress=False
            )
            results[label] = (report.stats["AP"], report.stats["AP50"], time.perf_counter() - start)
            print(f"  {label}: AP {report.stats['AP']:.4f} ({results[label][2]:.0f} s)", file=sys.stderr)
    ref = results["pytorch fp32"][0]
    print(f"\ndemo model, val split (300 images), {machine_line()}")
    print("| backend precision | mAP | AP50 | mAP - PyTorch fp32 (points) |")
    print("|---|---|---|---|")
    for label, (ap, ap50, _) in results.items():
        print(f"| {label} | {100 * ap:.2f} | {100 * ap50:.2f} | {100 * (ap - ref):+.2f} |")


def _calibrate_candidates(model, image: torch.Tensor, threshold: float, count: int) -> tuple[int, int]:
    """Shift ``model``'s class bias so that ``count`` (point, class) pairs of ``image [1, 3, H, W]``
    score above ``threshold``; returns how many do after the shift, and the image's number of points.

    A pair scores ``sqrt(sigmoid(cls + shift) * sigmoid(ctr)) > t`` exactly when
    ``shift > logit(t^2 / sigmoid(ctr)) - cls``: the shift is put between the count-th and the next
    smallest of those values.
    """
    with torch.inference_mode():
        out = model(image)
        cls, ctr = out.cls_logits[0], out.ctr_logits[0]  # [A, C], [A]
        need = torch.logit((threshold**2 / torch.sigmoid(ctr)).clamp(max=1 - 1e-7))[:, None] - cls
        low, high = torch.sort(need.flatten().double()).values[count - 1 : count + 1].tolist()
        model.head.cls_score.bias += (low + high) / 2
        out = model(image)
        hw = torch.tensor([image.shape[-2:]], dtype=torch.float32)
        scores, _ = dense_scores_and_boxes(out, hw, hw)
    return int((scores > threshold).sum()), int(out.points.shape[0])


def _nms_cost(options: InferenceOptions, anchors: int, classes: int) -> dict[int, float]:
    """Median seconds of select_detections on one image with 10^2, 10^3, 10^4 candidates (random
    boxes and scores over the threshold)."""
    gen = torch.Generator().manual_seed(1)
    costs = {}
    for count in (100, 1000, 10000):
        scores = torch.zeros(1, anchors, classes)
        flat = torch.randperm(anchors * classes, generator=gen)[:count]
        scores.view(-1)[flat] = options.score_threshold + torch.rand(count, generator=gen) * 0.9
        xy = torch.rand(1, anchors, 2, generator=gen) * 1200
        boxes = torch.cat([xy, xy + 20 + torch.rand(1, anchors, 2, generator=gen) * 200], dim=-1)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            select_detections(scores, boxes, score_threshold=options.score_threshold)
            times.append(time.perf_counter() - start)
        costs[count] = statistics.median(times)
    return costs


def _calibration_folder(args: argparse.Namespace, tmp: Path, h: int, w: int) -> Path:
    """The int8 calibration images: ``--calibration`` if given, else generated noise images (the
    weights are random, so any input of the right statistics calibrates them)."""
    if args.calibration:
        return Path(args.calibration)
    import cv2

    folder = tmp / "calibration"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(args.speed_calibration_images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return folder


def speed(args: argparse.Namespace) -> None:
    cfg = get_entry("atss_res50_coco_3x_800size").config
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    h, w = 800, 1333
    options = InferenceOptions.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    inputs = {b: torch.rand((b, 3, h, w), generator=gen) * 255 for b in (1, args.batch)}
    passing, anchors = _calibrate_candidates(model, inputs[1], options.score_threshold, args.candidates)
    print(f"  class bias shifted: {passing} candidates above {options.score_threshold}", file=sys.stderr)
    runners: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {}
    skipped: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        calibration = _calibration_folder(args, Path(tmp), h, w)
        for backend, precision in ROWS:
            if (backend, precision) == ("openvino", "fp16"):
                continue  # fp16 weights, f32 compute on this CPU: the fp32 row's speed
            if backend == "pytorch":
                runner = Detector(model, device="cpu").runner
            else:
                path = _export(
                    model, backend, precision, Path(tmp), calibration, args.speed_calibration_images, 0
                )
                try:
                    runner = Detector.from_checkpoint(path).runner
                except OptionError as exc:  # e.g. a bf16 IR on a CPU without bf16 arithmetic
                    print(f"  {backend} {precision}: not measured here: {exc}", file=sys.stderr)
                    skipped.append(f"{backend} {precision} ({exc})")
                    continue

            def run(images, hw, runner=runner):
                with torch.inference_mode():
                    return runner.detect(images, hw, hw, options)

            runners[f"{backend} {precision}"] = run
        results = {}
        for batch, repeats in ((1, args.repeats), (args.batch, max(1, args.repeats - 1))):
            images = inputs[batch]
            hw = torch.tensor([[h, w]] * batch, dtype=torch.float32)
            fns = {k: (lambda fn=fn, x=images, s=hw: fn(x, s)) for k, fn in runners.items()}
            results[batch] = interleaved_medians(fns, repeats=repeats, warmup=1)
            # Printed as each phase ends: a run cut short on a loaded machine keeps what it measured.
            base = results[batch]["pytorch fp32"]
            for label, t in results[batch].items():
                print(
                    f"  batch {batch}: {label} {t:.3f} s ({base / t:.2f}x PyTorch fp32)",
                    file=sys.stderr,
                    flush=True,
                )
        costs = _nms_cost(options, anchors, cfg.num_classes)
    base1, base8 = results[1]["pytorch fp32"], results[args.batch]["pytorch fp32"]
    print(f"\nATSS-R50 random weights, {h}x{w}, {passing} candidates per image, {machine_line()}")
    print(
        f"| backend precision | latency batch 1 (s) | vs PyTorch | throughput batch {args.batch} (img/s) | vs PyTorch |"
    )
    print("|---|---|---|---|---|")
    for label in runners:
        t1, t8 = results[1][label], results[args.batch][label]
        print(f"| {label} | {t1:.3f} | {base1 / t1:.2f}x | {args.batch / t8:.2f} | {base8 / t8:.2f}x |")
    for text in skipped:
        print(f"\nnot measured: {text}")
    cost_text = ", ".join(f"{n} candidates {1000 * t:.1f} ms" for n, t in costs.items())
    print(
        f"\nselect_detections alone, one image of {anchors} points x {cfg.num_classes} classes: {cost_text}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["accuracy", "speed", "all"])
    parser.add_argument(
        "--demo", default="runs/demo", help="the demo's output folder (python -m atssdet demo)"
    )
    parser.add_argument("--calibration-images", type=int, default=300, help="int8 calibration images")
    parser.add_argument(
        "--keep-float", type=int, default=0, help="also int8 rows with N layers kept in float"
    )
    parser.add_argument(
        "--calibration",
        help="speed: int8 calibration folder (default: the demo's train images, else generated)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=1000,
        help="speed: (point, class) pairs per image above the score threshold (random weights, see above)",
    )
    parser.add_argument(
        "--speed-calibration-images",
        type=int,
        default=16,
        help="speed: int8 calibration images (random weights)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    if args.part in ("accuracy", "all"):
        if not (Path(args.demo) / "model.safetensors").is_file():
            sys.exit(
                f"{args.demo}/model.safetensors: no demo model; make it with: python -m atssdet demo --out {args.demo}"
            )
        accuracy(args)
    if args.part in ("speed", "all"):
        if args.calibration is None and (Path(args.demo) / "data" / "train").is_dir():
            args.calibration = str(Path(args.demo) / "data" / "train")
        speed(args)


if __name__ == "__main__":
    main()
