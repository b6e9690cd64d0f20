"""Training: :func:`train` (the loop) composing checkpoints, schedule, log, step and weight initialisation.

    from atssdet.training import train, TrainingError, TrainResult

Modules: :mod:`~atssdet.training.loop` (``train``), :mod:`~atssdet.training.step` (one optimisation
step), :mod:`~atssdet.training.checkpoint` (save, load, list, resume checks, RNG state),
:mod:`~atssdet.training.schedule` (learning rate, optimizer), :mod:`~atssdet.training.log` (JSONL,
progress bar, ETA), :mod:`~atssdet.training.weights` (ImageNet backbone / fine-tuning start),
:mod:`~atssdet.training.data` (the checked training split).
"""

from atssdet.training.loop import train
from atssdet.training.result import TrainingError, TrainResult

__all__ = ["TrainResult", "TrainingError", "train"]
