"""Inference speed: Detector throughput at batch 1/4/8 and post-processing time at 1k/5k candidates.

    python benchmarks/bench_predict.py                      # ATSS-R50, random weights, CPU
    python benchmarks/bench_predict.py --height 512 --width 768 --repeats 3

Throughput: ``--images`` same-size synthetic BGR images of ``--height`` x ``--width`` (already at
test scale, so the resize is a no-op) through ``Detector.predict`` (forward + post-processing) with
each batch size, after one warm-up run per batch size; the median over ``--repeats`` runs is
reported. Post-processing: ``select_detections`` on synthetic dense scores ``[1, A, 80]`` in which
exactly K (anchor, class) entries exceed the 0.05 threshold, boxes random in an 800x1333 image.
All peers run in the same process, one after the other; ratios are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.detector import Detector  # noqa: E402
from atssdet.loader import load  # noqa: E402
from atssdet.postprocess import select_detections  # noqa: E402
from benchmarks.common import median_time  # noqa: E402


def dense_case(
    num_candidates: int, num_points: int, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[1, A, C]`` with exactly ``num_candidates`` entries > 0.05, boxes ``[1, A, 4]``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand((1, num_points, num_classes), generator=g) * 0.05  # all <= 0.05: not candidates
    flat = torch.randperm(num_points * num_classes, generator=g)[:num_candidates]
    scores.view(-1)[flat] = 0.05 + 0.001 + torch.rand(num_candidates, generator=g) * 0.9
    xy = torch.rand((1, num_points, 2), generator=g) * torch.tensor([1333.0, 800.0])
    wh = 16 + torch.rand((1, num_points, 2), generator=g) * 240
    boxes = torch.cat((xy, xy + wh), dim=-1)
    return scores, boxes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="atss_res50_coco_3x_800size")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--images", type=int, default=8, help="images per timed run (multiple of 8)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--cls-bias",
        type=float,
        default=-6.0,
        help="classifier bias: with random weights and the prior bias (-4.6) nearly all 1.6M (point, class) "
        "scores pass 0.05 and NMS swamps the timing; -6 leaves a few hundred, like a trained model",
    )
    args = parser.parse_args()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores"
    )

    if not args.skip_throughput:
        torch.manual_seed(0)
        model = load(args.model)
        with torch.no_grad():
            assert model.head.cls_score.bias is not None
            model.head.cls_score.bias.fill_(args.cls_bias)
        detector = Detector(
            model,
            device=args.device,
            short_size=min(args.height, args.width),
            max_size=max(args.height, args.width),
        )
        rng = np.random.default_rng(0)
        images = [
            rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)
        ]
        print(
            f"\nthroughput: {args.model} (random weights, classifier bias {args.cls_bias}), {args.images} "
            f"images of {args.height}x{args.width}, median of {args.repeats}"
        )
        print(f"{'batch':>5}  {'s/run':>8}  {'img/s':>7}  {'vs batch 1':>10}")
        base = None
        for bs in args.batch_sizes:
            detector.predict(images[:bs], batch_size=bs)  # warm-up: oneDNN builds kernels per shape
            t = median_time(
                lambda bs=bs: detector.predict(images, batch_size=bs), repeats=args.repeats, warmup=0
            )
            rate = args.images / t
            base = base or rate
            print(f"{bs:>5}  {t:8.2f}  {rate:7.3f}  {rate / base:9.2f}x")

    # 1067x800 input: A = 18134 points over p3..p7 (the cat reference image at test scale).
    print("\npost-processing: select_detections on [1, 18134, 80] dense scores, median of 20")
    print(f"{'candidates':>10}  {'ms':>8}  {'kept':>5}")
    for k in (1000, 5000):
        scores, boxes = dense_case(k, 18134, 80, seed=k)
        assert int((scores > 0.05).sum()) == k
        (dets,) = select_detections(scores, boxes)
        t = median_time(lambda s=scores, b=boxes: select_detections(s, b), repeats=20, warmup=0)
        print(f"{k:>10}  {t * 1000:8.2f}  {len(dets):>5}")


if __name__ == "__main__":
    main()
