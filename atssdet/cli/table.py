"""``atssdet table``: several metrics/results files side by side (the seed's ``test_in_table``)."""

from __future__ import annotations

import argparse

from atssdet.cli.common import SubParsers, add_command, given


def add_parser(sub: SubParsers) -> None:
    p = add_command(
        sub,
        "table",
        help="compare metrics/results files in a markdown table",
        description="Print the 12 COCO statistics (percent) of several files side by side, one row per "
        "file: atssdet metrics JSON files (written by `eval`), or COCO results JSON files with --data.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="*.metrics.json (or results JSON with --data)")
    p.add_argument("--data", default=None, help="COCO annotation JSON, to score results files")
    p.add_argument("--digits", type=int, help="decimals of the percentages (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from atssdet.evaluation.tables import compare_files

    print(compare_files(args.files, gt=args.data, **given(args, "digits")))
    return 0
