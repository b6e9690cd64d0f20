"""ATSS-R50 vs torchvision FCOS-R50 inference on CPU at 800x1333, same run.

    python benchmarks/bench_inference.py [--repeats 5] [--height 800 --width 1333]

Both models have random weights. ATSS is timed in three stages: pre-processing (MegEngine resize
of a BGR uint8 image + batching), forward, and post-processing (threshold + per-class NMS + top-100).
Random weights put every one of ~1.6M class scores above the 0.05 threshold, which no trained model
does; for the post-processing stage the classifier logits are shifted so that 2,000 candidates pass,
a typical count for a trained COCO model. FCOS is timed end to end (its own transform, forward and
post-processing, with torchvision's default thresholds). On CPU ATSS runs inference on NHWC
(channels_last) activations; the NCHW forward and an NHWC FCOS are timed too, so the layout gain is
shown separately from the model difference.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.config import PRESETS  # noqa: E402
from atssdet.data.transforms import images_to_batch, resize_shortest_edge  # noqa: E402
from atssdet.modeling import build_model  # noqa: E402
from atssdet.postprocess import dense_scores_and_boxes, select_detections  # noqa: E402
from benchmarks.common import interleaved_medians, machine_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--candidates", type=int, default=2000)
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)

    cfg = PRESETS["atss_res50_coco_3x_800size"]
    atss = build_model(cfg).eval()
    fcos = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).eval()
    # Layout peers: ATSS with its NHWC CPU path off (plain NCHW, as before), and FCOS given the same
    # trick (channels_last weights make its convolutions produce NHWC activations).
    atss_nchw = copy.deepcopy(atss)
    atss_nchw._use_nhwc = lambda x: False  # type: ignore[method-assign]
    fcos_nhwc = copy.deepcopy(fcos).to(memory_format=torch.channels_last)

    def pre() -> torch.Tensor:
        resized = resize_shortest_edge(image, cfg.test_image_short_size, cfg.test_image_max_size)
        return images_to_batch([resized])

    batch = pre()
    image_hw = torch.tensor([batch.shape[-2:]], dtype=torch.float32)
    orig_hw = torch.tensor([image.shape[:2]], dtype=torch.float32)
    with torch.inference_mode():
        output = atss(batch)
        scores, _ = dense_scores_and_boxes(output, image_hw, orig_hw)
        kth = torch.topk(scores.flatten(), args.candidates + 1).values[-1]
        # Shift logits so exactly ~`candidates` scores exceed 0.05 (see module docstring).
        target = torch.logit(torch.tensor(0.05) ** 2 / torch.sigmoid(output.ctr_logits).max())
        shift = target - torch.logit(kth**2 / torch.sigmoid(output.ctr_logits).max())
        shifted = output._replace(cls_logits=output.cls_logits + shift)
        dense = dense_scores_and_boxes(shifted, image_hw, orig_hw)
        n_candidates = int((dense[0] > 0.05).sum())
    fcos_input = [torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1).float() / 255.0]

    def forward() -> None:
        with torch.inference_mode():
            atss(batch)

    def post() -> None:
        select_detections(*dense, score_threshold=0.05, nms_threshold=0.6, max_detections=100)

    def forward_nchw() -> None:
        with torch.inference_mode():
            atss_nchw(batch)

    def fcos_full() -> None:
        with torch.inference_mode():
            fcos(fcos_input)

    def fcos_full_nhwc() -> None:
        with torch.inference_mode():
            fcos_nhwc(fcos_input)

    med = interleaved_medians(
        {
            "atss_pre": pre,
            "atss_forward": forward,
            "atss_post": post,
            "atss_forward_nchw": forward_nchw,
            "fcos_total": fcos_full,
            "fcos_total_nhwc": fcos_full_nhwc,
        },
        repeats=args.repeats,
    )
    total = med["atss_pre"] + med["atss_forward"] + med["atss_post"]
    print(
        f"# ATSS-R50 vs torchvision FCOS-R50, CPU, input {args.height}x{args.width}, {args.repeats} repeats"
    )
    print(f"# {machine_line()}; post-processing with {n_candidates} candidates above 0.05")
    print("| stage | median ms |")
    print("|---|---|")
    print(f"| ATSS pre-processing | {med['atss_pre'] * 1e3:.1f} |")
    print(f"| ATSS forward | {med['atss_forward'] * 1e3:.1f} |")
    print(f"| ATSS post-processing | {med['atss_post'] * 1e3:.1f} |")
    print(f"| ATSS total | {total * 1e3:.1f} |")
    print(f"| ATSS forward, NCHW (NHWC path off) | {med['atss_forward_nchw'] * 1e3:.1f} |")
    print(f"| torchvision FCOS total | {med['fcos_total'] * 1e3:.1f} |")
    print(f"| torchvision FCOS total, channels_last weights | {med['fcos_total_nhwc'] * 1e3:.1f} |")
    print(f"ratio ATSS/FCOS total: {total / med['fcos_total']:.3f}")
    print(f"ratio ATSS/FCOS total, both NHWC: {total / med['fcos_total_nhwc']:.3f}")
    print(f"ATSS forward NHWC/NCHW: {med['atss_forward'] / med['atss_forward_nchw']:.3f}")


if __name__ == "__main__":
    main()
