"""GPU figures for docs/gpu.md: reference parity on the device, then ATSS-R50 vs torchvision FCOS-R50.

    python benchmarks/gpu_bench.py --out runs/gpu/gpu_bench.json [--reference DIR] [--budget-s 300]
    python benchmarks/gpu_bench.py --smoke --out /tmp/smoke.json     # tiny sizes and models: seconds

Parity: the reference res18 checkpoint on the device, max |score| and |box| error against MegEngine's
stored outputs (``small``, ``cat``, two synthetic images), with TF32 off (float32 proper) and on
(PyTorch's default for cuDNN convolutions), and whether the detections match row by row.

Benchmark (random weights, 800 x 1333 inputs, cudnn.benchmark on: the sizes are fixed here): for each
model, precision (fp32, bf16 and fp16 autocast) and batch (1, 8): inference images/s (ATSS: forward,
dense scores, threshold + NMS + top-100, with the classifier bias shifted so that about 2,000 scores
per image pass 0.05, as for a trained model; FCOS: its whole ``forward`` with torchvision's
thresholds) and training images/s (forward, loss, backward, SGD step; fp16 through a GradScaler),
plus peak GPU memory. ATSS in channels_last is timed too (bf16/fp16, batch 8). Each figure is the
throughput over at least ``--min-time`` seconds after warm-up. Work past ``--budget-s`` is skipped
and listed, so the run always ends with a complete JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.config import PRESETS, with_overrides  # noqa: E402
from atssdet.criterion import atss_loss  # noqa: E402
from atssdet.modeling.atss import build_model  # noqa: E402
from atssdet.postprocess import dense_scores_and_boxes, select_detections  # noqa: E402
from atssdet.training.device import DeviceOptions  # noqa: E402

R18 = "atss_res18_coco_3x_800size"
PRECISIONS = ("fp32", "bf16", "fp16")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument(
        "--reference", default=None, help="MegEngine reference folder (parity is skipped without)"
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="skip benchmark entries past this time")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds timed per figure")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (a CPU run of the code paths)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "environment": environment(device, smoke=args.smoke),
        "parity": {},
        "benchmark": [],
        "skipped": [],
    }
    if args.reference and Path(args.reference, f"{R18}.seed0.pkl.gz").is_file():
        report["parity"] = parity(Path(args.reference), device, names=("small",) if args.smoke else None)
    else:
        report["skipped"].append(f"parity: no reference folder ({args.reference})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    size, batches = ((64, 96), (1,)) if args.smoke else ((800, 1333), (1, 8))
    for entry in plan(device, batches, smoke=args.smoke):
        if time.perf_counter() - t0 > args.budget_s:
            report["skipped"].append(f"{entry}: over the {args.budget_s:g} s budget")
            continue
        try:
            row: Any = measure(entry, device, size, min_time=args.min_time, smoke=args.smoke)
            report["benchmark"].append(row)
        except Exception as exc:  # one failing figure must not lose the others
            row = f"{entry}: {type(exc).__name__}: {exc}"
            report["skipped"].append(row)
        print(json.dumps(row), flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({len(report['benchmark'])} figures, {len(report['skipped'])} skipped)")


def environment(device: torch.device, *, smoke: bool) -> dict[str, Any]:
    env = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "device": str(device), "cuda": device.type == "cuda", "smoke": smoke}  # fmt: skip
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda_version=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), cudnn_benchmark=True,
                   tf32_conv_default=torch.backends.cudnn.allow_tf32)  # fmt: skip
    return env


def parity(reference: Path, device: torch.device, *, names: tuple[str, ...] | None) -> dict[str, Any]:
    """Max errors against MegEngine's outputs, with TF32 off and on (CUDA), and the detection match."""
    from atssdet.compat import CompatModel, DetEvaluator
    from atssdet.loader import load
    from tests.helpers import assert_dets_match

    outputs = dict(np.load(reference / f"{R18}.seed0.outputs.npz"))
    model = load(R18, weights=reference / f"{R18}.seed0.pkl.gz").to(device).eval()
    result: dict[str, Any] = {}
    for tf32 in (False, True) if device.type == "cuda" else (False,):
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
        rows: dict[str, dict[str, Any]] = {}
        for name in names or ("small", "cat", "synth_600x900", "synth_1000x700"):
            data, info = outputs[f"{name}__data"], outputs[f"{name}__im_info"]
            try:
                assert_dets_match(
                    DetEvaluator(model).predict(image=data, im_info=info), outputs[f"{name}__dets"]
                )
                rows[name] = {"detections_match": True}
            except AssertionError:
                rows[name] = {"detections_match": False}
            if f"{name}__scores" in outputs:  # raw outputs are stored for small and cat
                scores, boxes = CompatModel(model).eval()(image=data, im_info=info)
                rows[name]["max_score_error"] = float(
                    np.abs(scores.cpu().numpy() - outputs[f"{name}__scores"]).max()
                )
                rows[name]["max_box_error_px"] = float(
                    np.abs(boxes.cpu().numpy() - outputs[f"{name}__boxes"]).max()
                )
        result["tf32_on" if tf32 else "fp32"] = rows
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    return result


def plan(
    device: torch.device, batches: tuple[int, ...], *, smoke: bool
) -> list[tuple[str, str, str, int, bool]]:
    """(model, mode, precision, batch, channels_last) entries, in the order they run."""
    precisions = [p for p in PRECISIONS if device.type == "cuda" or p != "fp16"]  # fp16 autocast: GPU only
    entries = [(model, mode, p, b, False) for mode in ("inference", "train") for b in batches
               for p in precisions for model in ("atss_r50", "fcos_r50")]  # fmt: skip
    if smoke:  # FCOS-R50 training takes seconds a step on a CPU: left to the GPU run
        return [e for e in entries if e[:2] != ("fcos_r50", "train")]
    return entries + [
        ("atss_r50", mode, p, 8, True) for mode in ("inference", "train") for p in ("bf16", "fp16")
    ]


def measure(entry: tuple[str, str, str, int, bool], device: torch.device, size: tuple[int, int], *,
            min_time: float, smoke: bool) -> dict[str, Any]:  # fmt: skip
    """One figure: images/s and peak memory of ``entry`` on ``device``."""
    name, mode, precision, batch, channels_last = entry
    torch.manual_seed(0)
    opts = DeviceOptions(device, None if precision == "fp32" else precision)
    step = _atss_step if name == "atss_r50" else _fcos_step
    fn = step(mode, opts, batch, size, channels_last=channels_last, smoke=smoke)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    iters, seconds = _throughput(fn, device, min_time=min_time, warmup=1 if smoke else 3)
    row = {"model": name, "mode": mode, "precision": precision, "batch": batch, "channels_last": channels_last,
           "height": size[0], "width": size[1], "iters": iters, "seconds": round(seconds, 3),
           "images_per_s": round(batch * iters / seconds, 2)}  # fmt: skip
    if device.type == "cuda":
        row["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return row


def _throughput(
    fn: Callable[[], None], device: torch.device, *, min_time: float, warmup: int
) -> tuple[int, float]:
    """``(iterations, seconds)``: at least 3 iterations and ``min_time`` seconds, after ``warmup`` ones."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        fn()
    sync()
    start, iters = time.perf_counter(), 0
    while iters < 3 or time.perf_counter() - start < min_time:
        fn()
        sync()  # so that the clock sees finished work (costs a few microseconds per step)
        iters += 1
    return iters, time.perf_counter() - start


def _images(batch: int, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, *size), device=device).float()


def _targets(
    batch: int, size: tuple[int, int], device: torch.device, *, first_label: int
) -> list[dict[str, Any]]:
    h, w = size
    boxes = torch.tensor(
        [[0.1 * w, 0.1 * h, 0.5 * w, 0.6 * h], [0.4 * w, 0.3 * h, 0.9 * w, 0.9 * h]], device=device
    )
    labels = torch.tensor([first_label, first_label + 2], device=device)
    return [{"boxes": boxes, "labels": labels} for _ in range(batch)]


def _atss_step(mode: str, opts: DeviceOptions, batch: int, size: tuple[int, int], *, channels_last: bool,
               smoke: bool) -> Callable[[], None]:  # fmt: skip
    cfg = PRESETS["atss_res50_coco_3x_800size"]
    if smoke:
        cfg = with_overrides(PRESETS[R18], {"fpn_out_channels": 32, "fpn_top_in_channel": 32, "head_num_convs": 1,
                                            "head_norm_groups": 8})  # fmt: skip
    model = build_model(cfg).to(opts.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = _images(batch, size, opts.device)
    if mode == "train":
        model.train()
        targets = _targets(batch, size, torch.device("cpu"), first_label=0)  # CPU, as a loader gives them
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        scaler = opts.grad_scaler()

        def train() -> None:
            with opts.autocast():
                output = model(images)
            total = atss_loss(output, targets, cfg)["total_loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()

        return train
    model.eval()
    hw = torch.tensor([list(size)] * batch, dtype=torch.float32)
    with torch.inference_mode(), opts.autocast():
        scores, _ = dense_scores_and_boxes(model(images), hw, hw)
    # Shift the classifier bias so that ~2,000 scores per image pass 0.05 (random weights pass them all).
    kth = torch.topk(scores[0].flatten().float(), 2001).values[-1].clamp(1e-6, 1 - 1e-6)
    with torch.no_grad():
        model.head.cls_score.bias -= float(torch.logit(kth**2) - torch.logit(torch.tensor(0.05**2)))

    def infer() -> None:
        with torch.inference_mode(), opts.autocast():
            select_detections(*dense_scores_and_boxes(model(images), hw, hw))

    return infer


def _fcos_step(mode: str, opts: DeviceOptions, batch: int, size: tuple[int, int], *, channels_last: bool,
               smoke: bool) -> Callable[[], None]:  # fmt: skip
    kwargs = {"min_size": size[0], "max_size": size[1]} if smoke else {}
    model = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    model = model.to(opts.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = list(_images(batch, size, opts.device) / 255.0)
    if mode == "train":
        model.train()
        targets = _targets(batch, size, opts.device, first_label=1)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        scaler = opts.grad_scaler()

        def train() -> None:
            with opts.autocast():
                losses = model(images, targets)
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()

        return train
    model.eval()

    def infer() -> None:
        with torch.inference_mode(), opts.autocast():
            model(images)

    return infer


if __name__ == "__main__":
    main()
