"""Batched inference on images: :class:`Detector` (a runner plus MegEngine's test-time pre/post-processing).

Typical use::

    det = Detector.from_pretrained("atss_res50_coco_3x_800size")      # or Detector.from_checkpoint(path)
    for result in det.predict(["cat.jpg", cv2.imread("dog.png")], batch_size=4):
        print(result.names, result.scores)
        save_detections(result, "cat_drawn.jpg")                      # atssdet.visualize

Pre-processing is MegEngine's evaluation pipeline (``resize_shortest_edge`` to
``cfg.test_image_short_size``/``test_image_max_size`` with ``cv2.resize`` on uint8, zero padding),
so the results equal :meth:`atssdet.compat.DetEvaluator.predict` image by image.

Batching never changes a result: a convolution near an image's border sees whatever padding the
batch adds (and GroupNorm in the head averages over it), so images are only batched with others of
the same padded (/32) input size; each batch is exactly what each image would see alone.
Results are returned in input order.

One input never takes the others down: an input that cannot be read or resized, or whose forward
pass runs out of memory, yields a :class:`~atssdet.structures.Detections` with ``error`` set
(naming the input) and no boxes, a warning is logged, and the other images go on (a batch that
runs out of memory is retried one image at a time). Sizes, batch size and device are checked by
:mod:`atssdet.validate` before any model loads.

The model runs behind a :class:`~atssdet.runtime.Runner` (PyTorch or ONNX Runtime); the Detector
never asks which. Test-time options are one :class:`~atssdet.options.InferenceOptions`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from atssdet import validate
from atssdet.batching import group_by_padded_size, padded_size
from atssdet.data.transforms import images_to_batch
from atssdet.detector_inputs import (
    ImageInput,
    PrepareDataset,
    _Pending,
    error_result,
    no_collate,
    prepare_input,
)
from atssdet.errors import OptionError, describe_memory_error, is_memory_error
from atssdet.options import InferenceOptions
from atssdet.runtime.torch_runner import TorchRunner, select_with_options
from atssdet.structures import Detections

if TYPE_CHECKING:
    from atssdet.config import ATSSConfig
    from atssdet.modeling.atss import ATSS
    from atssdet.runtime import Runner

logger = logging.getLogger(__name__)

__all__ = ["Detector", "ImageInput", "unflip_boxes"]


def unflip_boxes(boxes_xyxy: Tensor, width: Tensor) -> Tensor:
    """Map boxes ``[..., 4]`` found on a horizontally flipped image back: ``x' = W - x`` (no -1), x1/x2 swapped.

    ``width`` broadcasts against ``boxes_xyxy[..., 0]`` (e.g. ``[N, 1]`` for ``[N, A, 4]``).
    """
    x1, y1, x2, y2 = boxes_xyxy.unbind(-1)
    return torch.stack((width - x2, y1, width - x1, y2), dim=-1)


class Detector:
    """A model behind a runner plus MegEngine's test-time pre/post-processing, for any number of images.

    ``Detector(model)`` wraps an :class:`~atssdet.modeling.atss.ATSS` in a
    :class:`~atssdet.runtime.torch_runner.TorchRunner` on ``device`` (None: CUDA when available, else
    the CPU); ``Detector(runner)`` takes any :class:`~atssdet.runtime.Runner` as it is (then
    ``device`` must be None or the runner's). ``short_size``/``max_size`` override the config's
    ``test_image_short_size``/``test_image_max_size`` (800/1333 for the zoo models).
    :attr:`options` are the defaults of :meth:`predict` (the config's ``test_*`` values).
    """

    def __init__(
        self,
        model_or_runner: ATSS | Runner,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        if isinstance(model_or_runner, nn.Module):  # adapt a bare model; runners are never told apart
            self.runner: Runner = TorchRunner(model_or_runner, device=device)
        else:
            self.runner = model_or_runner
            if device is not None and torch.device(device) != self.runner.device:
                raise ValueError(
                    f"device={device!r}: the runner given builds its batches on {self.runner.device}"
                )
        self.cfg: ATSSConfig = self.runner.cfg
        self.device: torch.device = self.runner.device
        self.short_size = validate.image_side(
            "short_size", short_size if short_size is not None else self.cfg.test_image_short_size
        )
        self.max_size = validate.image_side(
            "max_size", max_size if max_size is not None else self.cfg.test_image_max_size
        )
        self.options = InferenceOptions.from_config(self.cfg)
        self.weights: str | None = None  # where the weights came from, for reports
        self.half: torch.dtype | None = None  # autocast dtype of the forward pass (CUDA only), see use_half

    def use_half(self, dtype: str | torch.dtype | None = None) -> torch.dtype:
        """Run the forward pass under CUDA autocast in ``dtype`` (``"bf16"``/``"fp16"``; default bf16
        where the GPU has it, else fp16). Refused (OptionError) off CUDA and for ONNX Runtime: on the
        CPU, bf16 autocast made ATSS slower in our measurements, not faster (docs/scale.md)."""
        if self.device.type != "cuda" or not isinstance(self.runner, TorchRunner):
            raise OptionError(
                f"half: half precision runs only with PyTorch on a CUDA device (this detector runs on "
                f"{self.device}{'' if isinstance(self.runner, TorchRunner) else ' in ONNX Runtime'}); "
                "leave out --half"
            )
        if dtype is None:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        names = {"bf16": torch.bfloat16, "fp16": torch.float16}
        chosen = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if chosen not in (torch.bfloat16, torch.float16):
            raise OptionError(f"half: {dtype!r} is not one of bf16, fp16")
        self.half = chosen
        return chosen

    def _autocast(self) -> Any:
        if self.half is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.half)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        numerics: str | None = None,
    ) -> Detector:
        """Zoo model ``name`` with its official COCO weights (downloaded once, see :mod:`atssdet.download`).

        ``numerics="megengine"`` computes as MegEngine does (head GroupNorm rounded as its CPU kernel,
        NCHW, its FrozenBN formula; see ``ATSSConfig.numerics``); default: the config's (``"torch"``).
        """
        from atssdet.loader import load_runner

        validate.check_values(short_size=short_size, max_size=max_size, device=device)  # before loading
        overrides = None if numerics is None else {"numerics": numerics}
        det = cls(
            load_runner(name, overrides=overrides, device=device), short_size=short_size, max_size=max_size
        )
        det.weights = name
        return det

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        model: str | ATSSConfig | None = None,
        *,
        device: str | torch.device | None = None,
        short_size: int | None = None,
        max_size: int | None = None,
        numerics: str | None = None,
    ) -> Detector:
        """Weights from ``path`` (.safetensors, MegEngine .pkl/.pkl.gz, .pt/.pth) or an exported ``.onnx``.

        ``model`` is a zoo name or an :class:`ATSSConfig` (see :func:`atssdet.loader.load`). It may be
        omitted for an atssdet ``.safetensors`` or ``.onnx`` file, which carry their config; other
        formats need it. An ``.onnx`` file runs in ONNX Runtime (``device`` "cpu" or "cuda"); results
        are the same :class:`Detections`. ``numerics`` replaces the config's (not for ``.onnx``).
        """
        from atssdet.loader import load_runner

        validate.check_values(short_size=short_size, max_size=max_size, device=device)  # before loading
        overrides = None if numerics is None else {"numerics": numerics}
        runner = load_runner(model, weights=path, overrides=overrides, device=device)
        det = cls(runner, short_size=short_size, max_size=max_size)
        det.weights = str(path)
        return det

    def default_batch_size(self) -> int:
        """1 on CPU (batching is slower there: 0.80 vs 0.63 img/s at batch 1 vs 4, ATSS-R50 800x1333 on
        2 cores, benchmarks/bench_predict.py), 4 on a GPU."""
        return 4 if self.device.type == "cuda" else 1

    def describe(self) -> dict[str, Any]:
        """Model facts for output files: backbone, weights, classes, test sizes, device."""
        return {
            "backbone": self.cfg.backbone,
            "weights": self.weights,
            "num_classes": self.cfg.num_classes,
            "short_size": self.short_size,
            "max_size": self.max_size,
            "device": str(self.device),
            "numerics": self.cfg.numerics,
        }

    def predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        options: InferenceOptions | None = None,
    ) -> list[Detections]:
        """One :class:`Detections` per input, in input order (see :meth:`iter_predict`)."""
        return list(self.iter_predict(images, batch_size=batch_size, options=options))

    def iter_predict(
        self,
        images: Iterable[ImageInput],
        *,
        batch_size: int | None = None,
        options: InferenceOptions | None = None,
        keep_images: bool = False,
        workers: int = 0,
    ) -> Iterator[Detections]:
        """Yield one :class:`Detections` per input, in input order, reading files lazily.

        ``images``: file paths and/or BGR uint8 ``[H, W, 3]`` arrays (grey ``[H, W]`` accepted).
        ``options`` default to :attr:`options` (the config's ``test_cls_threshold`` 0.05, ``test_nms``
        0.6, ``test_max_boxes_per_image`` 100). ``options.flip_tta`` adds a horizontally flipped pass
        whose boxes are mapped back (``x' = W - x``) and pooled with the plain pass's candidates
        *before* the NMS, so each object keeps the single best box of either view. Array inputs are
        kept on the result (``result.image``) for drawing; file inputs are too when ``keep_images``.
        Boxes etc. are CPU tensors. ``batch_size`` (images per forward pass) defaults to
        :meth:`default_batch_size`. ``workers`` > 0 reads and resizes in that many DataLoader
        worker processes (the forward pass runs meanwhile); the results are the same.
        ``options.slicing`` runs each image as overlapping tiles, batched (``batch_size`` tiles per
        forward unless the SliceOptions say), merged back (:mod:`atssdet.slicing`).
        """
        given_batch = None if batch_size is None else validate.count("batch_size", batch_size)
        batch_size = self.default_batch_size() if given_batch is None else given_batch
        workers = validate.count("workers", workers, minimum=0)
        opts = self._checked(options)
        if opts.slicing is not None:  # tiles of one image at a time, batched (atssdet.slicing)
            from atssdet.slicing import iter_predict_sliced

            yield from iter_predict_sliced(
                self, images, opts, batch_size=given_batch, keep_images=keep_images
            )
            return
        if workers == 0:
            prepared: Iterable[_Pending | Detections] = (
                self._prepare(index, item, keep_images) for index, item in enumerate(images)
            )
        else:
            prepared = self._prepare_in_workers(images, workers, keep_images)
        yield from self._iter_batched(prepared, batch_size, opts)

    def _iter_batched(
        self, prepared: Iterable[_Pending | Detections], batch_size: int, opts: InferenceOptions
    ) -> Iterator[Detections]:
        """Run prepared inputs (in input order) in batches of equal padded size; yield in input order."""
        # Images wait in per-size buckets until one is full; results are released in input order.
        max_pending = 4 * batch_size
        buckets: dict[tuple[int, int], list[_Pending]] = {}
        done: dict[int, Detections] = {}
        next_out = 0
        for index, pending in enumerate(prepared):
            if isinstance(pending, Detections):
                done[index] = pending
            else:
                key = padded_size(*pending.resized.shape[:2])
                bucket = buckets.setdefault(key, [])
                bucket.append(pending)
                if len(bucket) >= batch_size:
                    done.update(self._run(buckets.pop(key), opts))
            # An image alone in its size bucket holds back the results after it (and, with
            # keep_images, their pixels): past the cap, run the bucket holding the oldest image.
            if buckets and sum(len(b) for b in buckets.values()) + len(done) > max_pending:
                oldest = min(buckets, key=lambda k: buckets[k][0].index)
                done.update(self._run(buckets.pop(oldest), opts))
            while next_out in done:
                yield done.pop(next_out)
                next_out += 1
        for key in sorted(buckets, key=lambda k: buckets[k][0].index):
            done.update(self._run(buckets[key], opts))
        while next_out in done:
            yield done.pop(next_out)
            next_out += 1

    def _prepare_in_workers(
        self, images: Iterable[ImageInput], workers: int, keep_images: bool
    ) -> Iterator[_Pending | Detections]:
        """:meth:`_prepare` in ``workers`` DataLoader processes (decode + resize overlap the forward
        pass); results come back in input order. torch's DataLoader, rather than a pool of our own:
        it already handles worker start-up, ordering, prefetching and a worker that dies."""
        from torch.utils.data import DataLoader

        dataset = PrepareDataset(list(images), self, keep_images)
        loader = DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=no_collate
        )
        yield from loader

    def detect_resized(
        self,
        resized: Sequence[np.ndarray],
        orig_hw: Sequence[tuple[int, int]],
        *,
        options: InferenceOptions | None = None,
        sources: Sequence[str] | None = None,
    ) -> list[Detections]:
        """Detections for images already resized by :func:`~atssdet.data.transforms.resize_shortest_edge`.

        ``resized``: BGR uint8 ``[h_i, w_i, 3]``; ``orig_hw``: the original ``(H_i, W_i)`` that boxes
        are mapped back to. Images run in batches of equal padded size (each as if alone); for
        pipelines that resize in loader threads (evaluation). ``options`` as in :meth:`iter_predict`.
        ``sources`` name the images in results and errors (default ``"<image i>"``); an image whose
        forward pass runs out of memory gets an error result, as in :meth:`iter_predict`.
        """
        opts = self._checked(options)
        names = list(sources) if sources is not None else [f"<image {i}>" for i in range(len(resized))]
        items = [
            _Pending(i, name, None, r, False, (int(hw[0]), int(hw[1])))
            for i, (name, r, hw) in enumerate(zip(names, resized, orig_hw, strict=True))
        ]
        done: dict[int, Detections] = {}
        for group in group_by_padded_size([it.resized.shape[:2] for it in items]):
            done.update(self._run([items[i] for i in group], opts))
        return [done[i] for i in range(len(items))]

    def _checked(self, options: InferenceOptions | None) -> InferenceOptions:
        """``options`` (default :attr:`options`), its class ids checked against the model's classes."""
        opts = self.options if options is None else options
        if opts.classes is not None and max(opts.classes, default=0) >= self.cfg.num_classes:
            raise OptionError(
                f"classes: label id {max(opts.classes)} out of range 0..{self.cfg.num_classes - 1}"
            )
        return opts

    def _prepare(self, index: int, item: ImageInput, keep_image: bool) -> _Pending | Detections:
        """Read/validate one input and resize it; an unreadable one becomes an error result."""
        return prepare_input(index, item, self.short_size, self.max_size, keep_image, self.cfg.class_names)

    def _error_result(self, source: str, message: str) -> Detections:
        return error_result(source, message, self.cfg.class_names)

    def _run(self, items: list[_Pending], options: InferenceOptions) -> dict[int, Detections]:
        """:meth:`_run_batch`; when it runs out of memory, each image again alone, and an image that
        still does becomes an error result (other errors concern every image and propagate)."""
        try:
            return self._run_batch(items, options)
        except Exception as exc:
            if not is_memory_error(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) > 1:
                out: dict[int, Detections] = {}
                for it in items:
                    out.update(self._run([it], options))
                return out
            it = items[0]
            h, w = it.resized.shape[:2]
            message = f"{it.source}: {describe_memory_error(exc)} running the model on its {w}x{h} input"
            return {it.index: self._error_result(it.source, message)}

    def _run_batch(self, items: list[_Pending], options: InferenceOptions) -> dict[int, Detections]:
        """Detect on images that share a padded size: one forward pass (two with flip TTA)."""
        image_hw = torch.tensor([it.resized.shape[:2] for it in items], dtype=torch.float32)
        orig_hw = torch.tensor([it.orig_hw for it in items], dtype=torch.float32)
        with torch.inference_mode(), self._autocast():
            if self.device.type == "cuda":  # build on the host, copy from pinned memory without a sync
                batch = images_to_batch([it.resized for it in items]).pin_memory()
                batch = batch.to(self.device, non_blocking=True)
            else:
                batch = images_to_batch([it.resized for it in items], device=self.device)
            if options.flip_tta:
                dets = self._detect_flip_tta(items, batch, image_hw, orig_hw, options)
            else:
                dets = self.runner.detect(batch, image_hw, orig_hw, options)
        out: dict[int, Detections] = {}
        for it, d in zip(items, dets, strict=True):
            out[it.index] = Detections(
                d.boxes.cpu().float(),
                d.scores.cpu().float(),
                d.labels.cpu(),
                class_names=self.cfg.class_names,
                image_hw=it.orig_hw,
                source=it.source,
                image=it.image if it.keep_image else None,
            )
        return out

    def _detect_flip_tta(
        self,
        items: list[_Pending],
        batch: Tensor,
        image_hw: Tensor,
        orig_hw: Tensor,
        options: InferenceOptions,
    ) -> list[Detections]:
        """Candidates of the plain and the mirrored pass pooled before one NMS (needs dense outputs)."""
        scores, boxes = self.runner.dense(batch, image_hw, orig_hw)  # [N, A, C], [N, A, 4]
        flipped = images_to_batch([cv2.flip(it.resized, 1) for it in items], device=self.device)
        scores_f, boxes_f = self.runner.dense(flipped, image_hw, orig_hw)
        boxes_f = unflip_boxes(boxes_f, orig_hw[:, 1, None].to(boxes_f.device))
        return select_with_options(
            torch.cat((scores, scores_f), dim=1), torch.cat((boxes, boxes_f), dim=1), options
        )
