"""What an evaluation produces: :class:`EvalReport`, and its results and metrics files."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atssdet.fileio import atomic_write_json


@dataclass
class EvalReport:
    """What one evaluation produced (identical on every rank)."""

    stats: dict[str, float]  # the 12 COCO statistics (fractions; -1 where no gt of that area exists)
    per_class_ap: dict[str, float]  # category name -> AP@[.5:.95] (nan when the class has no gt)
    num_images: int  # images evaluated (read and run)
    num_detections: int
    failed_images: list[str] = field(default_factory=list)  # "file: reason" per unreadable image
    results_path: str | None = None
    metrics_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metrics_path_for(results_path: str | os.PathLike[str]) -> Path:
    """``x.results.json`` -> ``x.metrics.json``; any other ``x.json`` -> ``x.metrics.json``."""
    p = Path(results_path)
    name = p.name
    for suffix in (".results.json", ".json"):
        if name.endswith(suffix):
            return p.with_name(name[: -len(suffix)] + ".metrics.json")
    return p.with_name(name + ".metrics.json")


def json_safe(obj: Any) -> Any:
    """NaN -> None, recursively through dicts and lists, so the file is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def write_eval_files(
    report: EvalReport,
    results: list[dict[str, Any]],
    out: str | os.PathLike[str],
    metrics: dict[str, Any],
) -> None:
    """Write the COCO results list to ``out`` (``COCO.loadRes`` reads it unchanged) and the metrics
    JSON next to it (:func:`metrics_path_for`: the report plus ``metrics``), both atomically;
    ``report`` gets the two paths."""
    results_path = atomic_write_json(out, results)
    metrics_path = metrics_path_for(results_path)
    report.results_path = str(results_path)
    report.metrics_path = str(metrics_path)
    atomic_write_json(metrics_path, json_safe({**report.to_dict(), **metrics}))
