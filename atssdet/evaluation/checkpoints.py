"""Evaluate several checkpoints in turn (what ``atssdet eval --weights A B ...`` does).

:func:`evaluate_checkpoints` expands ``--weights`` (paths, globs, an ``{epoch}`` pattern), loads each
through :func:`atssdet.loader.load_runner` (an ``.onnx`` export runs in ONNX Runtime), joins the
``torchrun`` process group once and yields one :class:`CheckpointResult` per checkpoint, so the
caller can print each as it finishes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atssdet import distributed
from atssdet.evaluation.loop import evaluate
from atssdet.evaluation.report import EvalReport
from atssdet.evaluation.tables import checkpoint_label, expand_checkpoints

if TYPE_CHECKING:
    from atssdet.options import SliceOptions


@dataclass(frozen=True)
class CheckpointResult:
    label: str  # the checkpoint's name (file name without suffixes), or the zoo model's
    weights: str | None  # the file evaluated (None: the zoo's pretrained weights)
    report: EvalReport
    world_size: int  # processes that shared the images


def plan_checkpoints(
    weights: Sequence[str] | None,
    model: str | None,
    *,
    out: str,
    start_epoch: int | None = None,
    end_epoch: int | None = None,
) -> list[tuple[str, str | None]]:
    """``(label, weights file or None)`` per run; refuses what would mix up output files."""
    if not weights and model is None:
        raise ValueError("give --model NAME and/or --weights FILE...")
    paths = expand_checkpoints(weights, start_epoch=start_epoch, end_epoch=end_epoch) if weights else []
    runs: list[tuple[str, str | None]] = [(checkpoint_label(p), str(p)) for p in paths] or [
        (str(model), None)
    ]
    if len(runs) > 1 and "{name}" not in out:
        raise ValueError(f"--out {out}: several checkpoints need a {{name}} placeholder in --out")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ValueError("several checkpoints share a file name; evaluate them in separate commands")
    return runs


def evaluate_checkpoints(
    weights: Sequence[str] | None,
    ann_file: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    model: str | None = None,
    out: str = "runs/eval/{name}.results.json",
    overrides: dict[str, Any] | None = None,
    device: str | None = None,
    start_epoch: int | None = None,
    end_epoch: int | None = None,
    batch_size: int = 1,
    num_workers: int = 2,
    progress: bool = True,
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S,
    slicing: SliceOptions | None = None,
) -> Iterator[CheckpointResult]:
    """:func:`~atssdet.evaluation.loop.evaluate` on each checkpoint; ``out``'s ``{name}`` is its label.

    ``weights``: files, globs or an ``{epoch}`` pattern (with ``start_epoch``/``end_epoch``); none:
    the zoo's pretrained ``model``. ``model`` names the architecture of files without a config
    (``.pkl``). ``overrides`` replace config fields (not for ``.onnx`` files). Under ``torchrun``
    every rank must iterate; the images of each checkpoint are sharded across the ranks.
    ``slicing``: sliced inference (:mod:`atssdet.slicing`) with the config's test options.
    """
    from atssdet.detector import Detector
    from atssdet.loader import load_runner

    runs = plan_checkpoints(weights, model, out=out, start_epoch=start_epoch, end_epoch=end_epoch)
    distributed.init_distributed(device=device, timeout=dist_timeout)
    dev = distributed.resolve_device(device)
    try:
        for label, path in runs:
            runner = load_runner(model, weights=path, overrides=overrides or None, device=dev)
            detector = Detector(runner)
            report = evaluate(
                detector,
                ann_file,
                image_dir,
                device=dev,
                out=out.replace("{name}", label),
                batch_size=batch_size,
                options=detector.options.replace(slicing=slicing),
                num_workers=num_workers,
                progress=progress,
                extra_metrics={"checkpoint": path, "model": model, "name": label},
            )
            yield CheckpointResult(label, path, report, distributed.get_world_size())
    finally:
        distributed.cleanup()
