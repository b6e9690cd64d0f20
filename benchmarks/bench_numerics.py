"""Cost of ``numerics="megengine"`` (MegEngine-rounded head GroupNorm) vs the default PyTorch kernel.

    python benchmarks/bench_numerics.py [--model atss_res50_coco_3x_800size] [--repeats 5]

Same weights in both models (random), CPU, an 800x1333 input: eval forward, and one training step
(forward + atss_loss + backward, batch 2 of 512x640 with 10 boxes per image). Peers run interleaved.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.config import PRESETS  # noqa: E402
from atssdet.criterion import atss_loss  # noqa: E402
from atssdet.modeling import build_model  # noqa: E402
from benchmarks.common import interleaved_medians, machine_line  # noqa: E402


def _boxes(generator: torch.Generator, n: int, h: int, w: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.7, h * 0.7])
    wh = 32 + torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.3, h * 0.3])
    return torch.cat([xy, xy + wh], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="atss_res50_coco_3x_800size", choices=sorted(PRESETS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = PRESETS[args.model]
    models = {"torch": build_model(cfg)}
    models["megengine"] = build_model(dataclasses.replace(cfg, numerics="megengine"))
    models["megengine"].load_state_dict(models["torch"].state_dict())
    image = torch.rand(1, 3, 800, 1333) * 255

    def infer(model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.eval()(image)

    g = torch.Generator().manual_seed(0)
    batch = torch.rand(2, 3, 512, 640) * 255
    targets = [
        {"boxes": _boxes(g, 10, 512, 640), "labels": torch.randint(0, cfg.num_classes, (10,), generator=g)}
        for _ in range(2)
    ]

    def step(model: torch.nn.Module) -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        losses = atss_loss(model(batch), targets, cfg)
        losses["total_loss"].backward()

    print(machine_line())
    print(f"{args.model}, CPU, median of {args.repeats}")
    for name, fn in (("eval forward 800x1333", infer), ("train step 2x512x640", step)):
        t = interleaved_medians(
            {k: functools.partial(fn, m) for k, m in models.items()}, repeats=args.repeats
        )
        print(
            f"{name:24s} torch {t['torch']:.3f} s   megengine {t['megengine']:.3f} s   "
            f"ratio {t['megengine'] / t['torch']:.2f}"
        )


if __name__ == "__main__":
    main()
