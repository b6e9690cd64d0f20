"""Flags shared by several commands, and reading back the ones the user gave."""

from __future__ import annotations

import argparse
from typing import Any

from atssdet.zoo import ZOO

SubParsers = argparse._SubParsersAction


def add_command(sub: SubParsers, name: str, *, help: str, description: str) -> argparse.ArgumentParser:
    """A sub-command whose omitted flags stay out of the namespace (the library's defaults apply).

    It takes the global ``--debug`` flag too (``atssdet --debug CMD`` and ``atssdet CMD --debug``)."""
    p = sub.add_parser(name, help=help, description=description, argument_default=argparse.SUPPRESS)
    add_debug_flag(p)
    return p


def add_debug_flag(p: argparse.ArgumentParser, *, default: Any = argparse.SUPPRESS) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="on an error, also print the Python traceback (a bug prints it always)",
    )


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """``{name: value}`` for the flags among ``names`` that were given on the command line, each
    checked by :func:`atssdet.validate.check_values` (a bad value raises OptionError naming it)."""
    from atssdet.validate import check_values

    return check_values(**{name: getattr(args, name) for name in names if hasattr(args, name)})


def add_model_flags(
    p: argparse.ArgumentParser,
    *,
    model_help: str,
    weights_help: str,
    nargs: str | None = None,
    zoo_choices: bool = True,
) -> None:
    """``--model NAME`` (argparse checks it against the zoo unless ``zoo_choices=False``: then the
    library does, with its own message) and ``--weights FILE``."""
    choices = sorted(ZOO) if zoo_choices else None
    p.add_argument("--model", choices=choices, default=None, help=model_help)
    p.add_argument("--weights", nargs=nargs, metavar="FILE", default=None, help=weights_help)


def add_device_flag(
    p: argparse.ArgumentParser, help: str = "cpu, cuda, cuda:1 ... (default: cuda if available)"
) -> None:
    p.add_argument("--device", default=None, help=help)


def add_set_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_progress_flag(p: argparse.ArgumentParser, help: str = "no progress bar") -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help=help)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set KEY=VALUE`` flags as a dict of config overrides (parsed by :func:`atssdet.config.parse_set_option`)."""
    from atssdet.config import parse_set_option

    return dict(parse_set_option(item) for item in args.set)


def add_slice_flags(p: argparse.ArgumentParser) -> None:
    """``--slice S [--slice-overlap F] [--slice-full-image] [--slice-merge nms|nmm]`` (atssdet.slicing)."""
    p.add_argument(
        "--slice", type=int, metavar="S", help="sliced inference: S x S tiles (original pixels), batched"
    )
    p.add_argument("--slice-overlap", type=float, metavar="F", help="tile overlap in [0, 1) (default 0.2)")
    p.add_argument(
        "--slice-full-image", action="store_true", help="also run the whole image and merge it with the tiles"
    )
    p.add_argument(
        "--slice-merge", choices=["nms", "nmm"], help="merge tiles by NMS or SAHI's greedy NMM (default nms)"
    )


def slice_options(args: argparse.Namespace) -> Any:
    """The :class:`~atssdet.options.SliceOptions` of the ``--slice*`` flags (validated), or None."""
    from atssdet.options import SliceOptions

    names = {"slice_overlap": "overlap", "slice_full_image": "full_image", "slice_merge": "merge"}
    extra = {field: getattr(args, flag) for flag, field in names.items() if hasattr(args, flag)}
    if not hasattr(args, "slice"):
        flags = [f"--{flag.replace('_', '-')}" for flag in names if hasattr(args, flag)]
        if flags:
            raise ValueError(f"{flags[0]} needs --slice S")
        return None
    return SliceOptions(size=args.slice, **extra)
