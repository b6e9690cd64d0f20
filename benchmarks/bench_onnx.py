"""ONNX Runtime vs PyTorch CPU latency for one ATSS model, measured in the same run.

    python benchmarks/bench_onnx.py                      # ATSS-R50, random weights, 800x1333, batch 1
    python benchmarks/bench_onnx.py --size 512 768 --repeats 10

Two pairs are timed, interleaved (A, B, A, B, ...) so both sides see the same machine load:
  dense: PyTorch model + dense_scores_and_boxes   vs  ONNX graph without NMS
  full:  PyTorch model + postprocess (NMS, top-k) vs  ONNX graph with NMS
Medians of the repeats and the ratio PyTorch / ONNX Runtime (> 1: ONNX Runtime faster) are printed.
Both use the same number of intra-op threads (--threads, default: all cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.export import export_onnx  # noqa: E402
from atssdet.modeling.atss import build_model  # noqa: E402
from atssdet.postprocess import dense_scores_and_boxes, postprocess  # noqa: E402
from atssdet.runtime.ort_runner import OrtRunner  # noqa: E402
from atssdet.zoo import get_entry  # noqa: E402


def interleaved_medians(
    a: Callable[[], object], b: Callable[[], object], *, repeats: int, warmup: int
) -> tuple[float, float]:
    for _ in range(warmup):
        a()
        b()
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="atss_res50_coco_3x_800size")
    parser.add_argument("--size", type=int, nargs=2, default=(800, 1333), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-full", action="store_true", help="time only the dense pair")
    parser.add_argument(
        "--cls-bias",
        type=float,
        default=-6.0,
        help="classification bias for the random model (default -6.0; nan keeps the init). Random weights "
        "give near-constant logits at the prior bias -4.6, so almost every (point, class) pair passes the "
        "0.05 threshold and NMS swamps the timing; -6.0 leaves a few hundred candidates, like a trained model",
    )
    args = parser.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(
        get_entry(args.model).config
    ).eval()  # random weights: latency does not depend on them
    if args.cls_bias == args.cls_bias:  # not nan
        with torch.no_grad():
            assert model.head.cls_score.bias is not None
            model.head.cls_score.bias.fill_(args.cls_bias)
    h, w = args.size
    images = torch.rand(args.batch, 3, h, w) * 255
    image_hw = torch.tensor([[h, w]] * args.batch, dtype=torch.float32)
    orig_hw = image_hw.clone()

    with tempfile.TemporaryDirectory() as tmp:
        dense_path = export_onnx(model, Path(tmp) / "dense.onnx")
        nms_path = export_onnx(model, Path(tmp) / "nms.onnx", with_nms=True)
        dense_det = OrtRunner(dense_path, device="cpu")
        nms_det = OrtRunner(nms_path, device="cpu")
        for det in (dense_det, nms_det):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            det.session = ort.InferenceSession(str(det.path), opts, providers=["CPUExecutionProvider"])

        def torch_dense() -> object:
            with torch.inference_mode():
                return dense_scores_and_boxes(model(images), image_hw, orig_hw)

        def torch_full() -> object:
            with torch.inference_mode():
                return postprocess(model(images), image_hw, orig_hw)

        with torch.inference_mode():
            scores, _ = torch_dense()
        candidates = int((scores > model.cfg.test_cls_threshold).sum())
        print(
            f"model {args.model} (random weights, cls bias {args.cls_bias}: {candidates} candidates > "
            f"{model.cfg.test_cls_threshold}), load average before: {os.getloadavg()[0]:.1f}"
        )
        print(
            f"input {args.batch}x3x{h}x{w} (padded to /32 in-graph), "
            f"CPU {platform.processor() or platform.machine()}, {args.threads} threads, "
            f"torch {torch.__version__}, onnxruntime {ort.__version__}, "
            f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up"
        )
        pairs = [("dense", torch_dense, lambda: dense_det.run(images, image_hw, orig_hw))]
        if not args.skip_full:
            pairs.append(
                (
                    "full (with NMS)",
                    torch_full,
                    lambda: nms_det.detect(images, image_hw, orig_hw, nms_det.baked),
                )
            )
        print(f"{'pipeline':<16} {'PyTorch ms':>11} {'ORT ms':>9} {'PyTorch/ORT':>12}")
        for name, torch_fn, ort_fn in pairs:
            t_torch, t_ort = interleaved_medians(torch_fn, ort_fn, repeats=args.repeats, warmup=args.warmup)
            print(f"{name:<16} {t_torch * 1e3:>11.1f} {t_ort * 1e3:>9.1f} {t_torch / t_ort:>11.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
