"""How a training run uses its device: mixed precision, channels_last, ``torch.compile``, cudnn.benchmark.

``opts = device_options(cfg, "cuda", amp="bf16", channels_last=True)`` checks the combination once,
before anything is built, and says what cannot run where:

* ``amp``: ``None`` (float32), ``"bf16"`` (autocast bfloat16; no loss scaling needed: bfloat16 has
  float32's exponent range; CPU or a CUDA device with bfloat16 support) or ``"fp16"`` (autocast
  float16 with a :class:`torch.amp.GradScaler`; CUDA only). ``True`` means ``"fp16"`` (the original
  ``--amp``). :func:`atssdet.criterion.atss_loss` computes the losses in float32 either way.
* ``channels_last``: NHWC weights, so convolutions run (and hand on) NHWC activations; Tensor Cores
  prefer it under AMP.
* ``compile``: :func:`torch.compile` of the forward pass (the first steps and every new input size
  compile; train images vary in size, so expect recompiles until shapes are marked dynamic).
* ``cudnn_benchmark``: let cuDNN time its algorithms per input shape. Off by default: the recipe's
  random short side (640..800) and aspect ratios give new shapes all the time, and each new shape
  pays the timing again; turn it on for fixed-size training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from atssdet import distributed
from atssdet.config import ATSSConfig
from atssdet.ops.norm import check_megengine_numerics_device

AMP_MODES = ("bf16", "fp16")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class DeviceOptions:
    """The device and the speed options of one training run (checked by :func:`device_options`)."""

    device: torch.device
    amp: str | None = None  # None, "bf16" or "fp16"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """The forward pass's autocast context (a no-op without ``amp``)."""
        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_AMP_DTYPES[self.amp])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for ``"fp16"`` (float16 gradients underflow without loss scaling)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")


def parse_amp(amp: bool | str | None) -> str | None:
    """``None``/``False`` -> None, ``True``/``"fp16"`` -> ``"fp16"``, ``"bf16"`` -> ``"bf16"``."""
    if amp is None or amp is False:
        return None
    if amp is True:
        return "fp16"
    if amp in AMP_MODES:
        return str(amp)
    raise ValueError(f"amp must be one of {', '.join(AMP_MODES)} (or True for fp16), got {amp!r}")


def device_options(
    cfg: ATSSConfig,
    device: str | torch.device | None,
    *,
    amp: bool | str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    cudnn_benchmark: bool = False,
) -> DeviceOptions:
    """:func:`~atssdet.distributed.resolve_device` plus the options, refusing what cannot train there
    (fp16 AMP or SyncBN off CUDA, bf16 on a GPU without it, MegEngine numerics off the CPU)."""
    dev = distributed.resolve_device(device)
    mode = parse_amp(amp)
    if mode == "fp16" and dev.type != "cuda":
        raise ValueError(
            f"--amp needs a CUDA device for fp16 (got {dev}): float16 with loss scaling is a GPU feature; "
            "use --amp bf16 on the CPU"
        )
    if mode == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--amp bf16: {torch.cuda.get_device_name(dev)} has no bfloat16 support; use fp16")
    if mode == "bf16" and not torch.amp.is_autocast_available(dev.type):
        raise ValueError(f"--amp bf16: autocast does not support {dev.type} devices")
    if cfg.backbone_norm == "SyncBN" and distributed.get_world_size() > 1 and dev.type != "cuda":
        raise ValueError(
            "backbone_norm=SyncBN needs CUDA devices under DDP (torch's SyncBatchNorm has no CPU kernel); "
            "use BN, GN or FrozenBN on CPU"
        )
    if cfg.numerics == "megengine":
        check_megengine_numerics_device(dev)
    return DeviceOptions(
        dev, mode, channels_last=channels_last, compile=compile, cudnn_benchmark=cudnn_benchmark
    )


def prepare_model(model: nn.Module, opts: DeviceOptions) -> nn.Module:
    """``model`` (already on ``opts.device``) in channels_last when asked; the same module, converted in place."""
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def compiled(net: nn.Module, opts: DeviceOptions) -> nn.Module:
    """``torch.compile(net)`` when ``opts.compile`` (wrap DDP first: compile then splits graphs at its
    buckets), else ``net``. Checkpoints keep saving the bare model, so their keys do not change."""
    if not opts.compile:
        return net
    return torch.compile(net)  # type: ignore[return-value]


@contextlib.contextmanager
def cudnn_autotuning(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark = enabled`` for the run; the previous value afterwards."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
