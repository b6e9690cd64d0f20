"""The seed's API: ``DetEvaluator.process_inputs``, ``model(image=, im_info=)`` and ``DetEvaluator.predict``.

Code written for MegEngine's model hub runs unchanged on top of the PyTorch model::

    model = atssdet.compat.hub_load("atss_res50_coco_3x_800size", weights="...pkl")
    data, im_info = DetEvaluator.process_inputs(cv2.imread("cat.jpg"), 800, 1333)
    scores, boxes = model(image=torch.tensor(data), im_info=torch.tensor(im_info))
    dets = DetEvaluator(model).predict(image=..., im_info=...)   # [K, 6] (x1, y1, x2, y2, score, class)

Unlike the seed, a batch of images is accepted (``predict`` then returns one array per image).
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from atssdet.batching import group_by_padded_size, padded_size
from atssdet.config import ATSSConfig
from atssdet.criterion import LOSS_KEYS, atss_loss
from atssdet.data.transforms import get_hw_by_short_size
from atssdet.modeling.atss import ATSS
from atssdet.postprocess import dense_scores_and_boxes, select_detections


def _to_tensor(x: Tensor | np.ndarray, device: torch.device) -> Tensor:
    return (x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))).to(device)


class CompatModel(nn.Module):
    """Wraps :class:`ATSS` with the seed's call signature.

    Eval mode: ``model(image=[N,3,h,w], im_info=[N,4|5])`` -> ``(scores [sum A_i, C], boxes [sum A_i, 4])``
    in original-image pixels, images concatenated in order (for one image exactly MegEngine's
    ``(pred_score, clipped_boxes)``). The batch is zero-padded bottom/right as MegEngine's loader does.
    """

    def __init__(self, model: ATSS) -> None:
        super().__init__()
        self.model = model

    @property
    def cfg(self) -> ATSSConfig:
        return self.model.cfg

    def dense(self, image: Tensor | np.ndarray, im_info: Tensor | np.ndarray) -> list[tuple[Tensor, Tensor]]:
        """Per image: dense scores ``[A_i, C]`` and boxes ``[A_i, 4]`` in original pixels.

        Images of the batch are grouped by padded size (:mod:`atssdet.batching`), so each image gets
        exactly the result it would get alone, whatever the batch around it.
        """
        device = next(self.model.parameters()).device
        image_t = _to_tensor(image, device).float()
        info = _to_tensor(im_info, device).float()
        if image_t.dim() != 4 or info.dim() != 2 or info.shape[0] != image_t.shape[0] or info.shape[1] < 4:
            raise ValueError(
                f"expected image [N, 3, H, W] and im_info [N, 4 or 5], got {tuple(image_t.shape)} "
                f"and {tuple(info.shape)}"
            )
        hw = [(int(h), int(w)) for h, w in info[:, :2].round().long().tolist()]
        results: list[tuple[Tensor, Tensor]] = [(torch.empty(0), torch.empty(0))] * len(hw)
        for group in group_by_padded_size(hw):
            ph, pw = padded_size(*hw[group[0]])
            batch = image_t[group, :, :ph, :pw]
            output = self.model(batch)
            scores, boxes = dense_scores_and_boxes(output, info[group, 0:2], info[group, 2:4])
            for j, i in enumerate(group):
                results[i] = (scores[j], boxes[j])
        return results

    def forward(
        self,
        image: Tensor | np.ndarray,
        im_info: Tensor | np.ndarray,
        gt_boxes: Tensor | np.ndarray | None = None,
    ) -> tuple[Tensor, Tensor] | dict[str, Tensor]:
        if self.training:
            if gt_boxes is None:
                raise ValueError("training mode needs gt_boxes [B, M, 5] (x1, y1, x2, y2, class 1..C)")
            return seed_training_losses(self.model, image, im_info, gt_boxes)
        with torch.no_grad():  # the seed's eval outputs carry no autograd graph
            per_image = self.dense(image, im_info)
        return torch.cat([s for s, _ in per_image]), torch.cat([b for _, b in per_image])


class DetEvaluator:
    """The seed's evaluator: ``process_inputs`` (static) and ``predict``."""

    def __init__(self, model: CompatModel | ATSS) -> None:
        self.model = model if isinstance(model, CompatModel) else CompatModel(model)

    @staticmethod
    def get_hw_by_short_size(
        im_height: int, im_width: int, short_size: int, max_size: int
    ) -> tuple[int, int]:
        return get_hw_by_short_size(im_height, im_width, short_size, max_size)

    @staticmethod
    def process_inputs(
        img: np.ndarray, short_size: int, max_size: int, flip: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """BGR uint8 ``[H, W, 3]`` -> ``(data [1, 3, h, w] float32, im_info [1, 4] float32)``, as MegEngine.

        Resizing is ``cv2.resize(INTER_LINEAR)`` on uint8 (fixed-point, unlike a float resize); no padding
        or normalisation here (the model does both).
        """
        original_height, original_width = img.shape[:2]
        h, w = get_hw_by_short_size(original_height, original_width, short_size, max_size)
        resized = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
        if flip:
            resized = cv2.flip(resized, 1)
        data = np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32)
        im_info = np.array([(h, w, original_height, original_width)], dtype=np.float32)
        return data, im_info

    @torch.inference_mode()
    def predict(
        self, image: Tensor | np.ndarray, im_info: Tensor | np.ndarray
    ) -> np.ndarray | list[np.ndarray]:
        """``[K, 6]`` float64 (x1, y1, x2, y2, score, class 0..C-1); a list of them for a batch of N > 1."""
        cfg = self.model.cfg
        arrays = []
        for scores, boxes in self.model.dense(image, im_info):
            (dets,) = select_detections(
                scores[None],
                boxes[None],
                score_threshold=cfg.test_cls_threshold,
                nms_threshold=cfg.test_nms,
                max_detections=cfg.test_max_boxes_per_image,
            )
            arrays.append(dets.to_array().cpu().numpy())
        return arrays[0] if len(arrays) == 1 else arrays


def hub_load(
    name: str,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    *,
    numerics: str = "torch",
) -> CompatModel:
    """The seed's ``hub.load(..., name, pretrained=True)``: a :class:`CompatModel` in eval mode.

    ``numerics="megengine"`` computes as MegEngine does where it shows (the head GroupNorm rounded as
    its CPU kernel, NCHW, its FrozenBN formula): outputs about 10x closer to MegEngine's, slower. See
    ``ATSSConfig.numerics``.
    """
    from atssdet.loader import load

    model = load(name, weights=weights, pretrained=pretrained, overrides={"numerics": numerics})
    return CompatModel(model).eval()


def seed_training_losses(
    model: ATSS, image: Tensor | np.ndarray, im_info: Tensor | np.ndarray, gt_boxes: Tensor | np.ndarray
) -> dict[str, Tensor]:
    """The seed's ``model(image=, im_info=, gt_boxes=)`` in train mode, computed by :func:`atss_loss`.

    Args:
        image: ``[B, 3, H, W]`` raw BGR pixels 0-255 (padded to the batch maximum; the model pads to /32).
        im_info: ``[B, 5]`` rows ``(h, w, orig_h, orig_w, num_gts)``.
        gt_boxes: ``[B, M, 5]`` rows ``(x1, y1, x2, y2, class)`` with class 1..C; rows past ``num_gts`` ignored.

    Returns:
        ``{"total_loss", "loss_cls", "loss_bbox", "loss_ctr"}`` as in MegEngine's ``ATSS.forward``.
    """
    device = next(model.parameters()).device
    image_t = (
        torch.as_tensor(np.asarray(image) if not isinstance(image, Tensor) else image).to(device).float()
    )
    info = torch.as_tensor(np.asarray(im_info) if not isinstance(im_info, Tensor) else im_info).to(device)
    gts = torch.as_tensor(np.asarray(gt_boxes) if not isinstance(gt_boxes, Tensor) else gt_boxes).to(device)
    if image_t.dim() != 4 or image_t.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W], got {tuple(image_t.shape)}")
    batch = image_t.shape[0]
    if info.dim() != 2 or info.shape[0] != batch or info.shape[1] < 5:
        raise ValueError(f"im_info must be [B, 5] (h, w, orig_h, orig_w, num_gts), got {tuple(info.shape)}")
    if gts.dim() != 3 or gts.shape[0] != batch or gts.shape[2] != 5:
        raise ValueError(f"gt_boxes must be [B, M, 5] (x1, y1, x2, y2, class 1..C), got {tuple(gts.shape)}")
    targets = []
    for i in range(batch):
        num_gts = int(info[i, 4])
        if not 0 <= num_gts <= gts.shape[1]:
            raise ValueError(f"im_info[{i}, 4] = {num_gts} gt boxes, but gt_boxes has {gts.shape[1]} rows")
        rows = gts[i, :num_gts]
        targets.append({"boxes": rows[:, :4].float(), "labels": rows[:, 4].round().long() - 1})
    losses = atss_loss(model(image_t), targets, model.cfg)
    return {key: losses[key] for key in LOSS_KEYS}
