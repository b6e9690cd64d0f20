"""atssdet: the ATSS object detector family in PyTorch, with MegEngine model-zoo parity."""

from atssdet.config import PRESETS, ATSSConfig
from atssdet.modeling.atss import ATSS, ATSSOutput, build_model
from atssdet.postprocess import Detections, postprocess
from atssdet.predict import Detector
from atssdet.zoo import ZOO, load

__version__ = "0.1.0"

__all__ = [
    "ATSS",
    "ATSSConfig",
    "ATSSOutput",
    "Detections",
    "Detector",
    "PRESETS",
    "ZOO",
    "build_model",
    "load",
    "postprocess",
]
