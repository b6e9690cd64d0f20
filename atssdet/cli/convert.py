"""``atssdet convert``: a MegEngine .pkl checkpoint to safetensors."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command
from atssdet.zoo import ZOO

COMMAND = "convert"  # the written-by mark of DST (atssdet.guard)


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "convert",
        help="convert a MegEngine .pkl checkpoint to safetensors",
        description="Read a MegEngine checkpoint with a restricted unpickler (no code runs), check every "
        "key and shape against the model, and write an atssdet .safetensors file.",
    )
    p.add_argument("src", help="MegEngine .pkl (or .pkl.gz) checkpoint")
    p.add_argument("dst", help="output .safetensors path")
    p.add_argument("--model", required=True, choices=sorted(ZOO), help="zoo model the checkpoint belongs to")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing DST that convert did not write"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet.convert import convert_checkpoint
    from atssdet.fileio import mark_written
    from atssdet.guard import OutputGuard
    from atssdet.zoo import get_entry

    guard = OutputGuard(COMMAND, inputs=[args.src], overwrite=getattr(args, "overwrite", False))
    guard.check([args.dst])  # before the source is read
    out = mark_written(convert_checkpoint(args.src, args.dst, get_entry(args.model).config), COMMAND)
    print(f"wrote {out}")
    return 0
