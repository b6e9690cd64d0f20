"""What :func:`atssdet.training.train` returns, and the error it stops with."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atssdet.config import ATSSConfig


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, too many unreadable images); the message says why and where."""


@dataclass
class TrainResult:
    """What :func:`~atssdet.training.train` did (identical on every rank, except that files exist only once)."""

    start_iteration: int  # iterations already done when this call started (0, or the resumed checkpoint's)
    iteration: int  # iterations done at the end
    losses: list[dict[str, float]]  # one entry per iteration run by this call: iteration, losses, lr
    checkpoint: Path | None  # the last checkpoint written
    weights: Path | None  # final weights (.safetensors) when training reached its end
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"iteration", "stats"} per validation
    skipped_images: list[str] = field(default_factory=list)  # "file: reason" of unreadable images
    config: ATSSConfig | None = None
