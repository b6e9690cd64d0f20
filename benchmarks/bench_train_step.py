"""Training-step time of ATSS-R50 vs torchvision FCOS-R50 (same images and targets, same run), and the
share of the ATSS step spent in ``atss_assign`` at 10 and 100 boxes per image.

    python benchmarks/bench_train_step.py [--repeats 5] [--height 512] [--width 640] [--device cpu]

One step = forward + loss + backward + SGD step; both models random init, frozen BN, batch 2.
Prints medians over ``--repeats`` timed steps (after one warm-up step; ATSS, FCOS and the
assignment alone take turns in every round).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import fcos_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.assign import atss_assign  # noqa: E402
from atssdet.config import ATSSConfig  # noqa: E402
from atssdet.criterion import atss_loss, pad_targets  # noqa: E402
from atssdet.modeling.atss import ATSS  # noqa: E402


def make_targets(
    num_boxes: int, height: int, width: int, generator: torch.Generator
) -> list[dict[str, torch.Tensor]]:
    targets = []
    for _ in range(2):
        xy = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        wh = 8 + torch.rand(num_boxes, 2, generator=generator) * torch.tensor([width * 0.4, height * 0.4])
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width, height]).float())], dim=1)
        labels = torch.randint(0, 80, (num_boxes,), generator=generator)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def freeze_like_atss(model: nn.Module) -> nn.Module:
    """FrozenBN everywhere in the backbone and conv1 + layer1 frozen, as ATSS trains (torchvision
    builds an untrained FCOS backbone with plain BatchNorm and every layer trainable)."""
    body = model.backbone.body  # type: ignore[union-attr]
    for name, module in list(body.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            parent = body.get_submodule(name.rsplit(".", 1)[0]) if "." in name else body
            setattr(parent, name.rsplit(".", 1)[-1], frozen)
    for name, param in body.named_parameters():
        if name.startswith(("conv1", "layer1")):
            param.requires_grad_(False)
    return model


def timed_interleaved(fns: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds per function; the functions take turns in every round so that load from
    other processes on a shared machine hits them alike. One untimed warm-up round first."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def bench_one(
    images: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    *,
    cfg: ATSSConfig,
    atss: ATSS,
    atss_opt: torch.optim.Optimizer,
    fcos: nn.Module,
    fcos_opt: torch.optim.Optimizer,
    repeats: int,
) -> tuple[float, float, float]:
    """Median seconds of (ATSS step, FCOS step, atss_assign alone) on one batch."""
    device = images.device

    def atss_step() -> None:
        losses = atss_loss(atss(images), targets, cfg)
        atss_opt.zero_grad(set_to_none=True)
        losses["total_loss"].backward()
        atss_opt.step()

    def fcos_step() -> None:
        losses = fcos(list(images), targets)
        fcos_opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        fcos_opt.step()

    with torch.no_grad():
        output = atss(images)
    gt_boxes, _, gt_valid = pad_targets(targets, num_classes=cfg.num_classes, device=device)

    def assign_only() -> None:
        atss_assign(output.points, output.num_points_per_level, cfg.stride, gt_boxes, gt_valid)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_atss, t_fcos, t_assign = timed_interleaved([atss_step, fcos_step, assign_only], repeats)
    return t_atss, t_fcos, t_assign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 3, args.height, args.width, generator=generator) * 255).to(device)

    cfg = ATSSConfig()  # ResNet-50, FrozenBN, conv1 + layer1 frozen
    atss = ATSS(cfg).to(device).train()
    atss_opt = torch.optim.SGD([p for p in atss.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    fcos = freeze_like_atss(fcos_resnet50_fpn(weights=None, weights_backbone=None)).to(device).train()
    fcos_opt = torch.optim.SGD([p for p in fcos.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    # torchvision resizes inside its transform; pin it to the input size so both see the same pixels.
    fcos.transform.min_size = (min(args.height, args.width),)  # type: ignore[union-attr]
    fcos.transform.max_size = max(args.height, args.width)  # type: ignore[union-attr]
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"batch 2 x {args.height}x{args.width}, median of {args.repeats}"
    )
    for num_boxes in (10, 100):
        targets = [
            {k: v.to(device) for k, v in t.items()}
            for t in make_targets(num_boxes, args.height, args.width, generator)
        ]
        t_atss, t_fcos, t_assign = bench_one(
            images,
            targets,
            cfg=cfg,
            atss=atss,
            atss_opt=atss_opt,
            fcos=fcos,
            fcos_opt=fcos_opt,
            repeats=args.repeats,
        )
        print(
            f"{num_boxes:3d} boxes/image: ATSS-R50 step {t_atss * 1e3:8.1f} ms | FCOS-R50 step {t_fcos * 1e3:8.1f} ms"
            f" | ATSS/FCOS {t_atss / t_fcos:5.2f} | atss_assign {t_assign * 1e3:6.1f} ms"
            f" = {100 * t_assign / t_atss:4.1f}% of the ATSS step"
        )


if __name__ == "__main__":
    main()
