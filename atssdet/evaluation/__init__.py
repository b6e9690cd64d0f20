"""COCO evaluation: run a detector over a COCO-format split, write the results JSON, score it.

The statistics are pycocotools' official ``COCOeval`` (bbox): the 12 numbers of
``COCOeval.summarize()`` under the names in :data:`atssdet.evaluation.coco.STAT_NAMES`, plus a
per-class AP table.

* :mod:`~atssdet.evaluation.loop`: :func:`evaluate` (batching, distributed sharding, the model runner);
* :mod:`~atssdet.evaluation.coco`: ground truth through the COCO schema, ``detections_to_coco``,
  ``COCOeval`` statistics and per-class AP;
* :mod:`~atssdet.evaluation.report`: :class:`EvalReport` and its results/metrics files;
* :mod:`~atssdet.evaluation.tables`: several checkpoints, metrics files, markdown tables.
"""

from atssdet.evaluation.loop import evaluate
from atssdet.evaluation.report import EvalReport

__all__ = ["EvalReport", "evaluate"]
