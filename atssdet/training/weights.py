"""Where a new training run's weights come from: ImageNet backbone weights or a detector to fine-tune.

Both read files through :func:`atssdet.convert.read_checkpoint_arrays`, the one checkpoint reader
(torchvision ``.pth`` with ``weights_only=True``, MegEngine ``.pkl`` with the restricted unpickler, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from atssdet.convert import CheckpointError, megengine_to_torch, read_checkpoint_arrays
from atssdet.modeling.atss import ATSS


def init_weights(
    model: ATSS,
    *,
    backbone: str | os.PathLike[str] | None = None,
    finetune: str | os.PathLike[str] | None = None,
) -> None:
    """Load ``backbone`` (:func:`load_backbone_weights`) and/or ``finetune`` (:func:`load_finetune_weights`),
    when given (:func:`~atssdet.training.train` accepts only one of them)."""
    if backbone is not None:
        load_backbone_weights(model, backbone)
    if finetune is not None:
        load_finetune_weights(model, finetune)


def _backbone_arrays(path: Path) -> dict[str, np.ndarray]:
    """ImageNet classification weights as ``{resnet key: array}``, ``fc.*`` and BN step counters dropped."""
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: unsupported backbone checkpoint type '.safetensors'; expected a torchvision .pth or a "
            "MegEngine classification .pkl"
        )
    arrays = read_checkpoint_arrays(path)[0]
    # torchvision's "module." prefix when saved from DataParallel
    arrays = {k.removeprefix("module."): v for k, v in arrays.items()}
    return {
        k: v for k, v in arrays.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }


def load_backbone_weights(model: ATSS, path: str | os.PathLike[str]) -> None:
    """Initialise ``model``'s ResNet from an ImageNet classification checkpoint (keys ``conv1``, ``bn1``, ``layerN``).

    Accepts torchvision ``.pth`` (read with ``weights_only=True``) and MegEngine classification ``.pkl``
    (restricted unpickler). The classifier ``fc.*`` is dropped; every other key must match the backbone
    (:class:`~atssdet.convert.CheckpointError` lists the mismatches otherwise).
    """
    bottom_up = model.backbone.bottom_up
    state = megengine_to_torch(_backbone_arrays(Path(path)), bottom_up, source=str(path))
    bottom_up.load_state_dict(state, strict=True)


def load_finetune_weights(model: ATSS, path: str | os.PathLike[str]) -> None:
    """Load a zoo-format detector checkpoint into ``model`` except its classifier ``head.cls_score``.

    ``model`` may predict another number of classes than the checkpoint: its freshly initialised
    ``cls_score`` (zero-mean weights, prior-probability bias) is kept, every other tensor comes from
    the checkpoint and must match in name and shape.
    """
    arrays = read_checkpoint_arrays(Path(path))[0]
    arrays = {k: v for k, v in arrays.items() if not k.startswith("head.cls_score.")}
    own = model.state_dict()
    for key in ("head.cls_score.weight", "head.cls_score.bias"):
        arrays[key] = own[key].detach().cpu().numpy()
    state = megengine_to_torch(arrays, model, source=str(path))
    model.load_state_dict(state, strict=True)
