"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

One module per command, each with ``add_parser(sub)`` (flags only) and ``run(args)`` (calls one
library function). Flags the user did not give are absent from ``args`` (``argparse.SUPPRESS``), so
the library's signatures hold the defaults. Nothing here imports torch before a command runs:
``--help`` and flag errors answer at once. :func:`main` is the one error boundary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from atssdet.cli import convert, data, demo, evaluate, export, models, predict, serve, table, train

COMMANDS = (convert, predict, models, data, demo, train, evaluate, table, export, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command; a user error prints ``atssdet CMD: error: ...`` and returns 2."""
    args = build_parser().parse_args(argv)
    from atssdet.convert import CheckpointError

    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"atssdet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
