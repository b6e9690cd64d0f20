"""The one way a model arrives: a zoo name, a checkpoint file, or both -> an ATSS model or a runner.

:func:`load` builds the PyTorch model (``.pkl``/``.pkl.gz`` MegEngine, ``.safetensors`` atssdet,
``.pt``/``.pth`` state dict, or the zoo's pretrained weights); :func:`load_runner` also opens an
exported ``.onnx`` file in ONNX Runtime or ``.xml`` OpenVINO IR. The CLI, :class:`~atssdet.detector.Detector`, ``serve``,
``hubconf``, ``eval`` and fine-tuning all come through here. :mod:`atssdet.zoo` describes the models,
:mod:`atssdet.download` fetches their weights and :mod:`atssdet.convert` reads checkpoint files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atssdet.config import ATSSConfig, with_overrides
from atssdet.convert import CheckpointError, load_weights, read_checkpoint_config
from atssdet.zoo import ZOO, get_entry

if TYPE_CHECKING:
    import torch

    from atssdet.modeling.atss import ATSS
    from atssdet.runtime import Runner

ModelName = str | ATSSConfig  # a zoo name, or the config of a model outside the zoo
# Exported files load_runner opens, and the runtime each runs in.
EXPORTED_SUFFIXES = {".onnx": ("an ONNX file", "ONNX Runtime"), ".xml": ("an OpenVINO IR", "OpenVINO")}


def load(
    name: ModelName | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> ATSS:
    """An ATSS model in eval mode.

    ``name``: a zoo name (:data:`atssdet.zoo.ZOO`) or an :class:`ATSSConfig`. ``weights``: a
    checkpoint file; an atssdet ``.safetensors`` carries its config, so ``name`` may then be omitted
    (a zoo name only fills in for files without a config; an ``ATSSConfig`` always wins). Without
    ``weights``, ``pretrained=True`` fetches the zoo's official checkpoint (downloaded and converted
    once, :func:`atssdet.download.fetch_pretrained`), else the weights are random. ``overrides``
    replace config fields (e.g. ``{"numerics": "megengine"}``). ``device``: where to put the model,
    resolved by :func:`atssdet.distributed.resolve_device`; None leaves it on the CPU.
    """
    from atssdet.modeling.atss import build_model

    path = _existing_file(weights)
    if path is not None and path.suffix in EXPORTED_SUFFIXES:
        kind, runtime = EXPORTED_SUFFIXES[path.suffix]
        raise ValueError(f"{path}: {kind} runs in {runtime}; open it with load_runner()")
    cfg = _config(name, path)
    if overrides:
        cfg = with_overrides(cfg, overrides)
    model = build_model(cfg)
    if path is not None:
        load_weights(model, path)
    elif pretrained:
        from atssdet.download import fetch_pretrained

        assert isinstance(name, str)  # _config refuses an ATSSConfig without weights
        load_weights(model, fetch_pretrained(get_entry(name)))
    if device is not None:
        from atssdet.distributed import resolve_device

        model = model.to(resolve_device(device))
    return model.eval()


def load_runner(
    name: ModelName | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> Runner:
    """What ``--model NAME`` / ``--weights FILE`` mean: a runner for :class:`~atssdet.detector.Detector`.

    ``weights`` ending in ``.onnx`` (an ``atssdet export`` file, config and thresholds in its
    metadata) -> :class:`~atssdet.runtime.ort_runner.OrtRunner`; ``.xml`` (an ``export --format
    openvino`` IR, its ``.bin`` beside it) -> :class:`~atssdet.runtime.ov_runner.OvRunner`;
    ``overrides`` other than ``numerics="torch"`` are refused for them. Anything else -> :func:`load` (no ``weights``: the
    zoo's pretrained checkpoint of ``name``) in a :class:`~atssdet.runtime.torch_runner.TorchRunner`.
    ``device`` None picks CUDA when available (ONNX Runtime: its CUDA provider), else the CPU.
    """
    path = _existing_file(weights)
    if path is not None and path.suffix == ".onnx":
        from atssdet.runtime.ort_runner import OrtRunner

        _refuse_onnx_overrides(path, overrides or {})
        return OrtRunner(path, device=device)
    if path is not None and path.suffix == ".xml":
        from atssdet.runtime.ov_runner import OvRunner

        _refuse_onnx_overrides(path, overrides or {})
        return OvRunner(path, device=device)
    from atssdet.runtime.torch_runner import TorchRunner

    model = load(name, weights=path, pretrained=path is None, overrides=overrides)
    return TorchRunner(model, device=device)


def _existing_file(weights: str | os.PathLike[str] | None) -> Path | None:
    if weights is None:
        return None
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    return path


def _config(name: ModelName | None, path: Path | None) -> ATSSConfig:
    """The model's config: an explicit ATSSConfig, else the file's own, else the zoo name's."""
    if isinstance(name, ATSSConfig):
        if path is None:
            raise ValueError("a model given by its ATSSConfig needs weights=FILE (there is no download)")
        return name
    saved = read_checkpoint_config(path) if path is not None else None
    if saved is not None:
        return saved
    if name is not None:
        return get_entry(name).config
    if path is None:
        raise ValueError("give a zoo model name (--model NAME) and/or a weights file (--weights FILE)")
    # Both phrasings are what the predict and eval commands have always printed.
    raise CheckpointError(
        f"{path}: this checkpoint does not say which model it belongs to: it carries no config; name "
        f"the model with --model NAME on the command line or name=NAME in Python (only atssdet "
        f".safetensors files carry a config; zoo names: {', '.join(ZOO)})"
    )


def _refuse_onnx_overrides(path: Path, overrides: dict[str, Any]) -> None:
    kind = EXPORTED_SUFFIXES[path.suffix][0]
    numerics = overrides.get("numerics", "torch")
    if numerics not in (None, "torch"):
        raise ValueError(f"{path}: numerics={numerics!r} needs the PyTorch model, not {kind}")
    others = sorted(k for k in overrides if k != "numerics")
    if others:
        raise ValueError(
            f"{path}: overriding {', '.join(others)} does not apply to {kind} (its config is baked in at export)"
        )
