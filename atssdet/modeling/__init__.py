"""nn.Modules of the ATSS detector; attribute names mirror MegEngine checkpoint keys."""

from atssdet.modeling.atss import ATSS, ATSSOutput, build_model

__all__ = ["ATSS", "ATSSOutput", "build_model"]
