"""Pure tensor functions shared by the model, assignment, losses and post-processing."""

from atssdet.ops.boxes import ltrb_to_xyxy, xyxy_to_ltrb
from atssdet.ops.points import grid_points

__all__ = ["grid_points", "ltrb_to_xyxy", "xyxy_to_ltrb"]
