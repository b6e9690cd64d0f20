"""Two training checks for benchmarks/gpu_check.sh: a short AMP run whose loss must fall, and NCCL + DDP.

    python benchmarks/gpu_train_check.py amp --work DIR --out FILE.json [--amp fp16] [--iters 80]
    torchrun --standalone --nproc_per_node=1 benchmarks/gpu_train_check.py nccl --out FILE.json

``amp``: :func:`atssdet.training.train` on a synthetic shapes dataset with the CPU demo's model (a
16-wide ResNet-18, 160 px images), AMP and channels_last, on CUDA (bf16 on a CPU); passes when the
mean total loss of the last 10 iterations is below 0.8 x that of the first 10.

``nccl``: under torchrun, joins the process group with :func:`atssdet.distributed.default_backend`
(NCCL on CUDA), wraps a tiny ATSS in DistributedDataParallel and runs three
:func:`atssdet.training.step.train_step` calls (bf16, channels_last) plus an all_reduce. One GPU can
hold one NCCL rank only, so this is world size 1: it proves the backend, DDP's bucketed gradient
all-reduce and the step's collectives run on NCCL, not multi-GPU scaling.
Each writes a JSON summary and exits 1 on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.config import DEMO_PRESETS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("check", choices=("amp", "nccl"))
    parser.add_argument("--out", required=True, help="JSON summary to write")
    parser.add_argument("--work", default="runs/gpu_train_check", help="dataset and run folder (amp)")
    parser.add_argument("--amp", default="fp16", choices=("fp16", "bf16"), help="precision of the amp check")
    parser.add_argument("--iters", type=int, default=80)
    args = parser.parse_args()
    t0 = time.perf_counter()
    summary = amp_check(args) if args.check == "amp" else nccl_check()
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
        print(json.dumps(summary))
    return 0 if summary["ok"] else 1


def amp_check(args: argparse.Namespace) -> dict[str, Any]:
    from atssdet.data.synth import generate_synthetic_dataset
    from atssdet.training import train

    cuda = torch.cuda.is_available()
    amp = args.amp if cuda else "bf16"
    work = Path(args.work)
    ds = generate_synthetic_dataset(
        work / "synth", num_train=64, num_val=0, image_size=(160, 160), progress=False
    )
    cfg = dataclasses.replace(DEMO_PRESETS["atss_demo_cpu"], warm_iters=10, train_image_short_size=(160,))
    result = train(
        cfg, train_ann=ds.train_ann, train_images=ds.train_images, out_dir=work / f"train_{amp}",
        batch_size=8 if cuda else 2, max_iters=args.iters, amp=amp, channels_last=True, device="cuda" if cuda else "cpu",
        num_workers=4 if cuda else 0, checkpoint_every=args.iters, progress=False, data_check="quick", log_every=10,
    )  # fmt: skip
    losses = [r["total_loss"] for r in result.losses]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    return {"check": "amp", "amp": amp, "device": "cuda" if cuda else "cpu", "iterations": len(losses),
            "first10_loss": first, "last10_loss": last, "ok": last < 0.8 * first}  # fmt: skip


def nccl_check() -> dict[str, Any]:
    import torch.distributed as dist
    from torch import nn

    from atssdet import distributed
    from atssdet.data.collate import collate_detection
    from atssdet.training.checkpoint import TrainingState
    from atssdet.training.device import DeviceOptions
    from atssdet.training.step import train_step
    from tests.test_device_guard import TINY, images, targets, tiny_model

    device = distributed.resolve_device(None)
    if device.type == "cuda":  # world size 1: resolve_device leaves the index to LOCAL_RANK's caller
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    backend = distributed.default_backend(device)
    dist.init_process_group(backend=backend)
    try:
        model = tiny_model().to(device).to(memory_format=torch.channels_last).train()
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        opts = DeviceOptions(device, "bf16", channels_last=True)
        run = TrainingState(
            model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), opts.grad_scaler()
        )
        samples: list[Any] = [
            (
                im,
                {
                    "boxes": t["boxes"].numpy(),
                    "labels": t["labels"].numpy(),
                    "image_id": i,
                    "orig_hw": (64, 96),
                },
            )
            for i, (im, t) in enumerate(zip(images(), targets(), strict=True))
        ]
        losses = [
            train_step(net, collate_detection(samples), [], TINY, run, iteration=i, opts=opts, last_checkpoint=None)
            .losses["total_loss"] for i in range(3)
        ]  # fmt: skip
        total = torch.ones(1, device=device)
        dist.all_reduce(total)
        ok = (
            dist.get_backend() == backend and float(total) == dist.get_world_size() and losses[-1] < losses[0]
        )
        return {"check": "nccl", "backend": str(dist.get_backend()), "device": str(device),
                "world_size": dist.get_world_size(), "losses": losses, "ok": ok}  # fmt: skip
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
