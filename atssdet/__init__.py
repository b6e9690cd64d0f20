"""atssdet: the ATSS object detector family in PyTorch, with MegEngine model-zoo parity.

The public names below are imported on first use (PEP 562), so ``import atssdet.cli`` and
``python -m atssdet --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ATSS": "atssdet.modeling.atss",
    "ATSSOutput": "atssdet.modeling.atss",
    "build_model": "atssdet.modeling.atss",
    "ATSSConfig": "atssdet.config",
    "PRESETS": "atssdet.config",
    "Detections": "atssdet.structures",
    "postprocess": "atssdet.postprocess",
    "Detector": "atssdet.detector",
    "InferenceOptions": "atssdet.options",
    "ZOO": "atssdet.zoo",
    "load": "atssdet.loader",
}

__all__ = [
    "ATSS",
    "ATSSConfig",
    "ATSSOutput",
    "Detections",
    "Detector",
    "InferenceOptions",
    "PRESETS",
    "ZOO",
    "build_model",
    "load",
    "postprocess",
]

if TYPE_CHECKING:
    from atssdet.config import PRESETS, ATSSConfig
    from atssdet.detector import Detector
    from atssdet.loader import load
    from atssdet.modeling.atss import ATSS, ATSSOutput, build_model
    from atssdet.options import InferenceOptions
    from atssdet.postprocess import postprocess
    from atssdet.structures import Detections
    from atssdet.zoo import ZOO


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atssdet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
