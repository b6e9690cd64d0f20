"""Command-line interface: ``python -m atssdet <command> ...`` (also the ``atssdet`` console script).

One module per command, each with ``add_parser(sub)`` (flags only) and ``run(args)`` (calls one
library function). Flags the user did not give are absent from ``args`` (``argparse.SUPPRESS``), so
the library's signatures hold the defaults; the values given are checked by :mod:`atssdet.validate`
as they are read (:func:`atssdet.cli.common.given`). Nothing here imports torch before a command
runs: ``--help`` and flag errors answer at once.

:func:`main` is the one error boundary: an error the user's input caused (see
:func:`atssdet.errors.describe_user_error`) prints ``atssdet CMD: error: <input>: <problem>`` and
returns 2, with the traceback only under ``--debug``; anything else is a bug in atssdet: its
traceback is printed with a line asking to report it, and the status is 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from atssdet.cli import convert, data, demo, evaluate, export, models, predict, serve, table, train
from atssdet.cli.common import add_debug_flag

COMMANDS = (convert, predict, models, data, demo, train, evaluate, table, export, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atssdet", description="ATSS object detectors in PyTorch")
    add_debug_flag(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command; a user error prints ``atssdet CMD: error: ...`` and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"atssdet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        return report_error(args.command, exc, debug=bool(getattr(args, "debug", False)))


def report_error(command: str, exc: BaseException, *, debug: bool = False) -> int:
    """Print ``exc`` the way the boundary does; returns the exit status (2: user error, 1: a bug)."""
    from atssdet.errors import REPORT_URL, describe_user_error

    message = describe_user_error(exc)
    if message is None:
        traceback.print_exception(exc, file=sys.stderr)
        print(
            f"atssdet {command}: internal error ({type(exc).__name__}): this is a bug in atssdet, not in "
            f"your input; please report it with the traceback above at {REPORT_URL}",
            file=sys.stderr,
        )
        return 1
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"atssdet {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
