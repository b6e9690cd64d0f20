"""Several checkpoints side by side: checkpoint expansion and labels, metrics files, markdown tables."""

from __future__ import annotations

import glob
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atssdet.data.coco_records import CocoFile
from atssdet.evaluation.coco import (
    STAT_DEFINITIONS,
    STAT_NAMES,
    GroundTruth,
    coco_stats,
    read_ground_truth,
    read_json,
)


def expand_checkpoints(
    patterns: Sequence[str], *, start_epoch: int | None = None, end_epoch: int | None = None
) -> list[Path]:
    """Checkpoint paths from ``patterns``: plain paths, globs (sorted naturally), and ``{epoch}`` templates.

    A pattern containing ``{epoch}`` is expanded for every epoch in ``start_epoch..end_epoch``
    (inclusive, like the seed's ``-se/-ee``); missing files raise FileNotFoundError naming them.
    """
    out: list[Path] = []
    for pattern in patterns:
        if "{epoch}" in pattern:
            if start_epoch is None or end_epoch is None:
                raise ValueError(f"{pattern}: an {{epoch}} pattern needs --start-epoch and --end-epoch")
            if end_epoch < start_epoch:
                raise ValueError(f"--end-epoch {end_epoch} is before --start-epoch {start_epoch}")
            paths = [Path(pattern.format(epoch=e)) for e in range(start_epoch, end_epoch + 1)]
        elif glob.has_magic(pattern):
            paths = [Path(p) for p in sorted(glob.glob(pattern), key=_natural_key)]
            if not paths:
                raise FileNotFoundError(f"{pattern}: no checkpoint matches")
        else:
            paths = [Path(pattern)]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: checkpoint not found")
        out.extend(paths)
    return out


def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


_LABEL_SUFFIXES = (
    ".metrics.json",
    ".results.json",
    ".json",
    ".safetensors",
    ".pkl.gz",
    ".pkl",
    ".pth",
    ".pt",
)


def checkpoint_label(path: str | os.PathLike[str]) -> str:
    """A short name for a checkpoint or metrics/results file (file name without its suffixes)."""
    name = Path(path).name
    for suffix in _LABEL_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_metrics(
    path: str | os.PathLike[str], *, gt: GroundTruth | CocoFile | None = None
) -> dict[str, float]:
    """The 12 statistics from a metrics JSON (written by ``evaluate``) or a results JSON (needs ``gt``)."""
    p = Path(path)
    data = read_json(p, missing="no such file")
    if isinstance(data, dict) and isinstance(data.get("stats"), dict):
        stats = data["stats"]
        missing = [n for n in STAT_NAMES if n not in stats]
        if missing:
            raise ValueError(f"{p}: metrics file lacks {', '.join(missing)}")
        return {n: float(stats[n]) for n in STAT_NAMES}
    if isinstance(data, list):
        if gt is None:
            raise ValueError(f"{p}: is a COCO results file; pass the annotation file (--data) to score it")
        return coco_stats(gt, data)
    raise ValueError(f"{p}: neither an atssdet metrics file nor a COCO results list")


def compare_files(
    paths: Sequence[str | os.PathLike[str]], *, gt: GroundTruth | None = None, digits: int = 1
) -> str:
    """:func:`format_stats_table` of metrics files, or of results files scored against ``gt``, one row each."""
    truth = read_ground_truth(gt) if gt is not None else None  # validated once, before any file is read
    return format_stats_table(
        [(checkpoint_label(p), load_metrics(p, gt=truth)) for p in paths], digits=digits
    )


def format_stats_table(rows: Sequence[tuple[str, dict[str, float]]], *, digits: int = 1) -> str:
    """Markdown table, one row per (name, stats), the 12 statistics in percent as columns (seed's ``test_in_table``)."""
    header = "| name | " + " | ".join(STAT_NAMES) + " |"
    rule = "|---|" + "|".join("---:" for _ in STAT_NAMES) + "|"
    lines = [header, rule]
    for name, stats in rows:
        cells = [_pct(stats.get(n, math.nan), digits) for n in STAT_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_per_class_table(per_class: dict[str, float], *, columns: int = 3, digits: int = 1) -> str:
    """Markdown table of per-class AP in percent, ``columns`` (class, AP) pairs per row."""
    items = list(per_class.items())
    header = "| " + " | ".join(["class | AP"] * columns) + " |"
    rule = "|" + "|".join(["---|---:"] * columns) + "|"
    lines = [header, rule]
    for i in range(0, len(items), columns):
        cells = []
        for j in range(columns):
            if i + j < len(items):
                name, ap = items[i + j]
                cells += [name, _pct(ap, digits)]
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_stats(stats: dict[str, float]) -> str:
    """The 12 statistics one per line, as ``COCOeval.summarize`` lists them (fractions, 3 decimals)."""
    return "\n".join(f"{name:>6} = {stats[name]:.3f}   {STAT_DEFINITIONS[name]}" for name in STAT_NAMES)


def _pct(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value) or value < 0:
        return "-"
    return f"{100.0 * value:.{digits}f}"
