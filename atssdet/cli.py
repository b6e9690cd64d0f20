"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

A thin argparse shell: each command parses its flags, builds a config and calls one library function.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from atssdet.zoo import ZOO


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a MegEngine .pkl checkpoint to safetensors",
        description="Read a MegEngine checkpoint with a restricted unpickler (no code runs), check every "
        "key and shape against the model, and write an atssdet .safetensors file.",
    )
    p.add_argument("src", help="MegEngine .pkl (or .pkl.gz) checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model the checkpoint belongs to")
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from atssdet.convert import convert_checkpoint
    from atssdet.zoo import get_entry

    out = convert_checkpoint(args.src, args.dst, get_entry(args.model).config)
    print(f"wrote {out}")
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="dataset tools (synthetic data, ...)", description="Dataset tools.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    _add_data_synth(data_sub)


def _add_data_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a synthetic COCO-format shapes dataset",
        description="Generate a deterministic COCO-format detection dataset of six shape classes "
        "(circle, rectangle, triangle, star, ring, cross) on textured backgrounds, with train and val "
        "splits. Skips the work when OUT already holds a complete dataset with the same parameters.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, required=True, help="number of training images")
    p.add_argument("--num-val", type=int, required=True, help="number of validation images")
    p.add_argument(
        "--seed", type=int, default=0, help="random seed (same seed -> identical files; default 0)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        default=[256, 384],
        metavar="PX",
        help="image side in pixels: one value (square images) or MIN MAX (each side drawn from the range; "
        "default 256 384)",
    )
    p.add_argument(
        "--format",
        choices=("png", "jpg"),
        default="png",
        help="image file format (jpg: ~4x smaller; default png)",
    )
    p.add_argument("--force", action="store_true", help="replace a dataset generated with other parameters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_data_synth)


def _run_data_synth(args: argparse.Namespace) -> int:
    from atssdet.data.synth import generate_synthetic_dataset

    if len(args.image_size) not in (1, 2):
        raise ValueError(f"--image-size takes 1 or 2 values, got {len(args.image_size)}")
    lo, hi = args.image_size[0], args.image_size[-1]
    out = generate_synthetic_dataset(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        seed=args.seed,
        image_size=(lo, hi),
        image_format=args.format,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"train: {out.train_ann} (images in {out.train_images})")
    print(f"val:   {out.val_ann} (images in {out.val_images})")
    print(f"classes: {', '.join(out.class_names)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_data(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from atssdet.convert import CheckpointError

    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"atssdet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
