"""Sliced inference: time versus tile count (batched vs one tile per forward), merge speed, and mAP.

    python benchmarks/bench_slicing.py speed                      # demo architecture, random weights, CPU
    python benchmarks/bench_slicing.py merge                      # greedy NMM: atssdet's tensors vs SAHI's
    python benchmarks/bench_slicing.py map --weights runs/demo/model.safetensors   # mAP with/without slicing

``speed``: square images holding n x n tiles of ``--tile`` px (overlap 0.2) for n = 1..``--max-grid``,
through ``Detector.predict`` with ``options.slicing`` at ``--tile-batch`` tiles per forward and at 1
(one forward per tile, what SAHI's default ``batch_size=1`` does); forward passes are counted with a
hook on the model; medians over ``--repeats`` runs, both peers interleaved (benchmarks/common.py).
``merge``: K random candidate boxes (6 classes, clustered like overlapping tiles' duplicates) merged by
:func:`atssdet.slicing.greedy_nmm` and by SAHI's ``batched_greedy_nmm`` (numpy index grouping) and
``GreedyNMMPostprocess`` (its user path on ``ObjectPrediction`` lists); needs ``sahi``.
``map``: ``--images`` generated large images with small shapes (:mod:`atssdet.data.synth_small`),
COCO mAP of the model without slicing and with slicing (NMS, NMM, NMM + the full image).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.config import DEMO_PRESETS  # noqa: E402
from atssdet.detector import Detector  # noqa: E402
from atssdet.options import InferenceOptions, SliceOptions  # noqa: E402
from atssdet.slicing import greedy_nmm, tile_windows  # noqa: E402
from benchmarks.common import interleaved_medians, machine_line, median_time  # noqa: E402


def speed(args: argparse.Namespace) -> None:
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    cfg = dataclasses.replace(
        DEMO_PRESETS["atss_demo_cpu"], test_image_short_size=args.tile, test_image_max_size=args.tile
    )
    model = build_model(cfg)
    forwards: list[int] = []
    model.register_forward_hook(lambda m, a, o: forwards.append(int(a[0].shape[0])))
    det = Detector(model, device="cpu")
    step = args.tile - int(round(args.tile * 0.2))
    print(f"# tiles of {args.tile} px (overlap 0.2), demo architecture, {machine_line()}")
    tb = args.tile_batch
    print(
        f"| grid | image | tiles | forwards (batch 1) | forwards (batch {tb}) | s (batch 1) | s (batch {tb}) "
        "| ms/tile batched | batched speed-up |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in range(1, args.max_grid + 1):
        side = args.tile + (n - 1) * step
        image = np.random.default_rng(n).integers(0, 255, (side, side, 3), dtype=np.uint8)
        tiles = len(tile_windows(side, side, args.tile, 0.2))
        counts = {}
        fns = {}
        for b in (1, args.tile_batch):
            opts = InferenceOptions(slicing=SliceOptions(size=args.tile, overlap=0.2, batch_size=b))
            forwards.clear()
            det.predict([image], options=opts)
            counts[b] = len(forwards)
            fns[b] = lambda o=opts, im=image: det.predict([im], options=o)
        times = interleaved_medians({str(k): v for k, v in fns.items()}, repeats=args.repeats)
        t1, tb = times["1"], times[str(args.tile_batch)]
        print(
            f"| {n}x{n} | {side} | {tiles} | {counts[1]} | {counts[args.tile_batch]} | {t1:.3f} | {tb:.3f} | {1000 * tb / tiles:.1f} | {t1 / tb:.2f}x |"
        )


def _candidates(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(k // 4, 2, generator=g) * 2000  # each object seen ~4 times by overlapping tiles
    idx = torch.randint(0, len(centres), (k,), generator=g)
    xy = centres[idx] + torch.randn(k, 2, generator=g) * 3
    wh = 16 + torch.rand(k // 4, 2, generator=g)[idx] * 30 + torch.randn(k, 2, generator=g)
    boxes = torch.cat((xy - wh / 2, xy + wh / 2), 1)
    labels = torch.randint(0, 6, (k // 4,), generator=g)[idx]
    return boxes, torch.rand(k, generator=g), labels


def merge(args: argparse.Namespace) -> None:
    from sahi.postprocess.combine import GreedyNMMPostprocess, batched_greedy_nmm
    from sahi.prediction import ObjectPrediction

    print(f"# greedy NMM, IoS 0.5, per class; {machine_line()}")
    print(
        "| candidates | atssdet greedy_nmm (ms) | SAHI batched_greedy_nmm (ms) | SAHI GreedyNMMPostprocess (ms) | kept (atssdet / SAHI) | SAHI / atssdet |"
    )
    print("|---|---|---|---|---|---|")
    for k in (500, 2000, 5000):
        boxes, scores, labels = _candidates(k, k)
        arr = torch.cat((boxes, scores[:, None], labels[:, None].float()), 1).numpy()
        preds = [
            ObjectPrediction(bbox=b, category_id=int(c), category_name=str(int(c)), score=float(s))
            for b, s, c in zip(boxes.clamp(min=0).tolist(), scores.tolist(), labels.tolist(), strict=True)
        ]
        post = GreedyNMMPostprocess(match_threshold=0.5, match_metric="IOS", class_agnostic=False)
        case = (boxes, scores, labels)
        ours = median_time(lambda c=case: greedy_nmm(*c, 0.5), repeats=args.repeats)  # type: ignore[misc]
        sahi_idx = median_time(lambda a=arr: batched_greedy_nmm(a, "IOS", 0.5), repeats=args.repeats)
        sahi_full = median_time(lambda p=post, q=preds: p(list(q)), repeats=max(1, args.repeats // 3))
        kept = len(greedy_nmm(boxes, scores, labels, 0.5)[0]), len(batched_greedy_nmm(arr, "IOS", 0.5))
        print(
            f"| {k} | {1000 * ours:.1f} | {1000 * sahi_idx:.1f} | {1000 * sahi_full:.0f} | {kept[0]} / {kept[1]} | {sahi_full / ours:.0f}x |"
        )


def mean_ap(args: argparse.Namespace) -> None:
    from atssdet.data.synth_small import generate_small_objects
    from atssdet.evaluation import evaluate

    det = Detector.from_checkpoint(args.weights, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_small_objects(
            tmp, num_images=args.images, size=(args.size, args.size), seed=args.seed
        )
        print(
            f"# {args.images} images of {args.size}x{args.size}, {data.num_boxes} objects of 12-40 px; "
            f"model {args.weights} (test size {det.short_size}/{det.max_size}); {machine_line()}"
        )
        print("| inference | mAP | AP50 | AP75 | AP small | s/image |")
        print("|---|---|---|---|---|---|")
        base = det.options
        runs = {"whole image (no slicing)": base}
        for merge_kind, full in (("nms", False), ("nmm", False), ("nmm", True)):
            sl = SliceOptions(size=args.tile, overlap=0.2, merge=merge_kind, full_image=full)
            name = f"slice {args.tile}, overlap 0.2, {merge_kind}" + (" + full image" if full else "")
            runs[name] = base.replace(slicing=sl)
        for name, opts in runs.items():
            start = time.perf_counter()
            report = evaluate(det, data.ann_file, data.images, options=opts, progress=False, num_workers=1)
            per_image = (time.perf_counter() - start) / args.images
            s = report.stats
            print(
                f"| {name} | {s['AP']:.3f} | {s['AP50']:.3f} | {s['AP75']:.3f} | {s['APs']:.3f} | {per_image:.2f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["speed", "merge", "map"])
    parser.add_argument("--tile", type=int, default=224, help="tile side (default 224, the demo test size)")
    parser.add_argument("--tile-batch", type=int, default=8)
    parser.add_argument("--max-grid", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", help="map: a model file (e.g. the demo's model.safetensors)")
    parser.add_argument("--images", type=int, default=20, help="map: generated images")
    parser.add_argument("--size", type=int, default=960, help="map: image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "map" and not args.weights:
        parser.error("map needs --weights")
    {"speed": speed, "merge": merge, "map": mean_ap}[args.mode](args)


if __name__ == "__main__":
    main()
