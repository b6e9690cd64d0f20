"""What ``eval --analysis DIR`` and ``eval --report PAGE`` add after the evaluation (hooked in from
outside :mod:`~atssdet.evaluation.loop`): the analysis files and the HTML page of each checkpoint."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atssdet.data.coco_records import CocoFile
from atssdet.errors import OptionError
from atssdet.evaluation.analysis_files import FIXED_FILES, analyse, analysis_guard, write_analysis
from atssdet.evaluation.report import EvalReport
from atssdet.evaluation.report_html import write_report_html
from atssdet.visualize import DRAW_SCORE_THRESHOLD


def extra_paths(
    labels: Sequence[str], analysis: str | None, report: str | None
) -> list[tuple[Path | None, Path | None]]:
    """Per checkpoint label: (analysis folder, report page). With several checkpoints the analysis goes
    to ``DIR/<label>/`` and the page path must hold ``{name}``."""
    if report is not None and len(labels) > 1 and "{name}" not in report:
        raise OptionError(f"--report {report}: several checkpoints are evaluated; put {{name}} in the path")
    out = []
    for label in labels:
        a = None if analysis is None else (Path(analysis) / label if len(labels) > 1 else Path(analysis))
        r = None if report is None else Path(report.replace("{name}", label))
        out.append((a, r))
    return out


def planned_outputs(pairs: Sequence[tuple[Path | None, Path | None]]) -> list[Path]:
    """The files known before the classes are (the guard checks the per-class curves again later)."""
    files: list[Path] = []
    for a, r in pairs:
        files += [] if a is None else [a / n for n in FIXED_FILES]
        files += [] if r is None else [r]
    return files


def write_extras(
    report: EvalReport,
    gt: CocoFile,
    image_root: str | os.PathLike[str],
    *,
    analysis_dir: Path | None,
    report_path: Path | None,
    inputs: Sequence[str | os.PathLike[str]] = (),
    score_threshold: float = DRAW_SCORE_THRESHOLD,
    overwrite: bool = False,
    title: str = "atssdet evaluation",
) -> list[Path]:
    """Analyse ``report``'s results file against ``gt`` and write the folder and/or the page."""
    if report.results_path is None:
        raise OptionError("--analysis/--report need the results file (eval --out)")
    results: list[dict[str, Any]] = json.loads(Path(report.results_path).read_bytes())
    a = analyse(gt, results, score_threshold=score_threshold)
    written: list[Path] = []
    if analysis_dir is not None:
        written += write_analysis(a, analysis_dir, inputs=inputs, overwrite=overwrite)
    if report_path is not None:
        analysis_guard(inputs, overwrite).check([report_path])
        written.append(write_report_html(report_path, report, a, gt, results, image_root, title=title))
    return written
