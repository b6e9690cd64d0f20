"""``atssdet demo``: the offline demo (synthetic data, training, COCO mAP, drawings, plot)."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command, add_device_flag, add_progress_flag, given


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "demo",
        help="offline demo: synthetic data, train a CPU-sized ATSS, evaluate, draw detections",
        description="Generate the synthetic shapes dataset (cached), train the atss_demo_cpu preset from "
        "scratch (reused when OUT already holds a model trained with the same config), evaluate COCO mAP on "
        "the val split, draw detections on held-out images and plot loss and mAP. Needs no network. Training "
        "checkpoints as it goes: a re-run after an interruption continues where it stopped.",
    )
    p.add_argument("--out", default=None, help="output folder (default runs/demo, or runs/demo-quick)")
    p.add_argument("--retrain", action="store_true", help="train again even if a matching model exists")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing files in OUT that the demo did not write"
    )
    add_device_flag(p)
    p.add_argument(
        "--quick",
        action="store_true",
        default=False,
        help="tiny dataset and a few iterations: checks the pipeline in seconds",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: idle cores minus one, at least 1; 1 on a 2-core machine)",
    )
    add_progress_flag(p, "no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet.demo import FULL_PLAN, QUICK_PLAN, run_demo

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    result = run_demo(
        out,
        plan=QUICK_PLAN if args.quick else FULL_PLAN,
        **given(args, "retrain", "device", "threads", "progress", "overwrite"),
    )
    print(result.summary())
    return 0
