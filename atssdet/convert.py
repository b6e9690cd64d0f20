"""MegEngine ``.pkl`` checkpoints -> PyTorch state dicts and safetensors files, without MegEngine.

The official hub files are protocol-4 pickles of an ``OrderedDict`` of float32 numpy arrays (training
checkpoints wrap it as ``{"epoch", "state_dict"}``). They are read by :mod:`atssdet.safe_pickle`
(a restricted unpickler that runs no code, with a size cap and arrays checked against the bytes
behind them); this module maps them onto the model, reads the other formats and writes safetensors.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atssdet.config import ATSSConfig
from atssdet.errors import torch_load_problem
from atssdet.fileio import atomic_path
from atssdet.safe_pickle import (
    CheckpointError,
    RestrictedUnpickler,
    check_file_size,
    load_megengine_pickle,
    max_checkpoint_bytes,
)

__all__ = [
    "CheckpointError",
    "RestrictedUnpickler",
    "convert_checkpoint",
    "load_megengine_pickle",
    "load_safetensors",
    "load_weights",
    "max_checkpoint_bytes",
    "megengine_to_torch",
    "read_checkpoint_arrays",
    "read_checkpoint_config",
    "save_safetensors",
]


def megengine_to_torch(
    arrays: Mapping[str, np.ndarray], model: nn.Module, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Map MegEngine arrays onto ``model``'s state-dict layout and check every key and shape.

    ``(1, C, 1, 1)`` conv biases become ``(C,)``; 5-D grouped conv weights
    ``(groups, out/g, in/g, kh, kw)`` become ``(out, in/g, kh, kw)``. Raises :class:`CheckpointError`
    naming every missing, unexpected or mis-shaped key, and any non-finite tensor.
    """
    target = model.state_dict()
    problems: list[str] = []
    out: dict[str, torch.Tensor] = {}
    for key, array in arrays.items():
        if key not in target:
            problems.append(f"unexpected key {key} {tuple(array.shape)}")
            continue
        want = tuple(target[key].shape)
        value = np.asarray(array)
        if value.shape != want:
            if value.size == int(np.prod(want)) and (
                value.ndim == 4 and value.shape[0] == 1 or value.ndim == 5
            ):
                value = value.reshape(want)
            else:
                problems.append(f"shape mismatch for {key}: checkpoint {tuple(array.shape)}, model {want}")
                continue
        want_dtype = target[key].dtype
        if want_dtype.is_floating_point != bool(np.issubdtype(value.dtype, np.floating)):
            problems.append(f"{key} has dtype {value.dtype}, model expects {want_dtype}")
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(want_dtype)
        if want_dtype.is_floating_point and not torch.isfinite(tensor).all():
            problems.append(f"{key} contains NaN or inf")
            continue
        out[key] = tensor
    # MegEngine BatchNorm has no step counter; keep the model's own for trainable BN layers.
    missing = [k for k in target if k not in arrays and not k.endswith("num_batches_tracked")]
    out.update({k: v for k, v in target.items() if k not in arrays and k.endswith("num_batches_tracked")})
    problems += [f"missing key {k} {tuple(target[k].shape)}" for k in missing]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise CheckpointError(
            f"{source}: does not match the {type(model).__name__} model ({len(problems)} problem(s)):\n  {shown}{more}"
        )
    return out


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, cfg: ATSSConfig | None = None
) -> Path:
    """Write ``state_dict`` (plus the config as metadata) atomically: temp file in the same folder, then rename."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {"format": "atssdet"}
    if cfg is not None:
        metadata["atssdet_config"] = cfg.to_json()
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
    return path


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], ATSSConfig | None]:
    """Read an atssdet safetensors file: ``(state_dict, config or None)``.

    The config is checked (field bounds, :class:`ATSSConfig`) before any tensor is read; bfloat16
    tensors (NumPy has no such dtype) are upcast to float32, exactly.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            cfg = _saved_config(path, f.metadata() or {})
            tensors = {k: _upcast_bfloat16(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from exc
    return tensors, cfg


def _upcast_bfloat16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def _saved_config(path: Path, meta: Mapping[str, str]) -> ATSSConfig | None:
    """The ``atssdet_config`` of a safetensors file's metadata (None if absent), checked by ATSSConfig."""
    text = meta.get("atssdet_config")
    if not text:
        return None
    try:
        return ATSSConfig.from_json(text)
    except (ValueError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid atssdet_config metadata: {exc}") from exc


def read_checkpoint_config(path: str | os.PathLike[str]) -> ATSSConfig | None:
    """The config stored in a safetensors file's metadata, or None (other formats carry none)."""
    if Path(path).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file: {exc}") from exc
    return _saved_config(Path(path), meta)


def _config_difference(saved: ATSSConfig, model: nn.Module) -> str:
    """Fields where ``saved`` differs from ``model.cfg`` (empty if the model has no config or none differ)."""
    current = getattr(model, "cfg", None)
    if not isinstance(current, ATSSConfig):
        return ""
    a, b = saved.__dict__, current.__dict__
    diff = [f"{k}={a[k]!r} (model: {b[k]!r})" for k in sorted(a) if a[k] != b.get(k)]
    return ", ".join(diff)


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def read_checkpoint_arrays(
    path: str | os.PathLike[str], *, max_bytes: int | None = None
) -> tuple[dict[str, np.ndarray], ATSSConfig | None]:
    """``({key: array}, config or None)`` from any checkpoint format atssdet reads, without a model.

    ``.pkl``/``.pkl.gz`` (MegEngine, restricted unpickler), ``.safetensors`` (atssdet; the config comes
    from its metadata) or ``.pt``/``.pth`` (``torch.load(weights_only=True)``; a state dict, possibly
    under ``"model"`` or ``"state_dict"``, whose every value must be a tensor). Any other suffix, an
    unreadable or corrupt file and a pickle that references anything but OrderedDict/numpy raise
    :class:`CheckpointError` naming the file. ``max_bytes`` (default :func:`max_checkpoint_bytes`)
    caps the file size, and a ``.pkl.gz`` file's decompressed size.
    """
    path = Path(path)
    suffix = _suffix(path)
    limit = max_checkpoint_bytes() if max_bytes is None else max_bytes
    if suffix in (".pkl", ".pkl.gz"):
        return dict(load_megengine_pickle(path, max_bytes=limit)), None
    if path.is_file():
        check_file_size(path, limit)
    if suffix == ".safetensors":
        tensors, saved_cfg = load_safetensors(path)
        return {k: v.numpy() for k, v in tensors.items()}, saved_cfg
    if suffix in (".pt", ".pth"):
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: cannot load with weights_only=True: {torch_load_problem(exc)}"
            ) from exc
        for nested in ("model", "state_dict"):
            if isinstance(obj, Mapping) and isinstance(obj.get(nested), Mapping):
                obj = obj[nested]
                break
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
        bad = [
            f"{k!r}: {type(v).__name__}"
            for k, v in obj.items()
            if not isinstance(k, str) or not isinstance(v, torch.Tensor)
        ]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise CheckpointError(
                f"{path}: not a state dict: {len(bad)} entr(ies) are not tensors under str keys ({shown})"
            )
        return {k: v.detach().cpu().numpy() for k, v in obj.items()}, None
    raise CheckpointError(
        f"{path}: unsupported checkpoint type {path.suffix or '(no suffix)'!r}; "
        "expected .pkl (MegEngine), .safetensors (atssdet) or .pt/.pth (PyTorch state dict)"
    )


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load any checkpoint :func:`read_checkpoint_arrays` reads into ``model``, strictly.

    Any key/shape mismatch raises :class:`CheckpointError` naming the file (and, for an atssdet
    ``.safetensors`` saved for another configuration, the differing config fields).
    """
    arrays, saved_cfg = read_checkpoint_arrays(path)
    try:
        state = megengine_to_torch(arrays, model, source=str(path))
    except CheckpointError as exc:
        diff = _config_difference(saved_cfg, model) if saved_cfg is not None else ""
        if diff:
            raise CheckpointError(
                f"{path}: was saved for another model configuration: {diff}\n{exc}"
            ) from exc
        raise
    model.load_state_dict(state, strict=True)


def convert_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], cfg: ATSSConfig) -> Path:
    """Convert a MegEngine ``.pkl`` into an atssdet ``.safetensors`` file for the model ``cfg`` describes."""
    arrays = load_megengine_pickle(src)  # first: a refused file costs no model (nor its imports)
    from atssdet.modeling.atss import build_model

    model = build_model(cfg)
    state = megengine_to_torch(arrays, model, source=str(src))
    model.load_state_dict(state, strict=True)
    return save_safetensors(model.state_dict(), dst, cfg=cfg)
