"""A device guard for CPU-only machines: a simulated accelerator that catches device mix-ups and host syncs.

``with DeviceGuard() as guard:`` makes :data:`DEVICE` (``torch.device("meta")``) behave like a GPU
whose memory happens to be the host's: ``model.to(DEVICE)``, ``torch.zeros(..., device=DEVICE)`` and
``x.to(DEVICE)`` give :class:`DeviceTensor` s, which report ``device(type='meta')`` but hold real CPU
data, so every op computes real values (data-dependent shapes, NMS, autograd and optimizer steps
work). Inside the guard:

* an op that meets a :class:`DeviceTensor` and a plain (host) tensor of one or more dimensions raises
  :class:`DeviceMixError`, as CUDA would (0-dim host tensors are allowed, as CUDA allows them);
* a host read of device values (``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``,
  ``.cpu()``/``.to("cpu")``, a copy into a host tensor) raises :class:`HostSyncError`, unless the
  innermost ``atssdet`` function on the stack is in ``allow`` (the documented, intended syncs);
  ``.numpy()`` always raises (it fails on CUDA tensors);
* ops whose output size depends on device values (``nonzero``, boolean-mask indexing, NMS, ...) are
  syncs on a GPU too, but inherent to detection: they are recorded in ``guard.implicit_syncs``
  (where they happened) so that tests can bound them.

Why ``meta``: it is the one non-CPU device every PyTorch build has (``"cuda"`` initialises CUDA as
soon as a tensor is moved there, and fails without a driver), autograd handles it with a no-op device
guard, and library code that reads ``x.device`` sees a non-CPU device, so CPU-only branches (NHWC on
CPU, float64 sqrt on CPU) are not taken, as on a GPU. Tensors created without a ``device`` land on
the host, exactly as on a GPU machine, so a forgotten ``device=`` is a host tensor meeting device
tensors: the mix-up this guard exists to catch.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision  # noqa: F401  (registers torch.ops.torchvision.nms)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

import atssdet

DEVICE = torch.device("meta")
_HOST = torch.device("cpu")
_PACKAGE = Path(atssdet.__file__).resolve().parent
_COMPREHENSION = re.compile(r"\.<locals>\.<(listcomp|dictcomp|setcomp)>")

# The documented, intended host syncs of the device path: innermost atssdet function -> why.
ALLOWED_SYNCS: dict[str, str] = {
    "training/step.py:train_step": "the step's losses are read once (one .tolist()) to log them and stop on NaN",
    "runtime/torch_runner.py:TorchRunner.detect": "detections are returned to the caller as CPU tensors",
    "criterion.py:_check_target_values": "targets that arrive on the device are validated with one read (CPU targets: none)",
}

_aten = torch.ops.aten
# Output size depends on device values: the host waits for the device (implicit syncs).
_IMPLICIT_SYNC_OPS = {
    _aten.nonzero.default, _aten.masked_select.default, _aten.unique_consecutive.default,
    _aten._unique2.default, _aten.unique_dim.default, _aten.repeat_interleave.Tensor,
    _aten.masked_scatter.default, torch.ops.torchvision.nms.default,
}  # fmt: skip
_CROSS_DEVICE_OPS = {_aten.copy_.default, _aten.copy.default}


class DeviceMixError(AssertionError):
    """A device tensor met a host tensor in one op (on a GPU: "Expected all tensors to be on the same device")."""


class HostSyncError(AssertionError):
    """Device values were read on the host outside the allow-list (on a GPU: the host waits for the device)."""


@dataclass
class SyncRecord:
    what: str  # e.g. "aten._local_scalar_dense (item/bool/float/int)", "aten.nonzero"
    where: str  # "training/step.py:train_step" (innermost atssdet function), or "<outside atssdet>"
    line: str  # file:line of that frame


class DeviceGuard(TorchDispatchMode):
    """The guard (see the module docstring). ``allow``: innermost ``atssdet`` function -> reason.

    ``syncs`` lists the allowed host reads that happened, ``implicit_syncs`` the data-dependent ops.
    """

    def __init__(self, allow: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.allow = dict(ALLOWED_SYNCS if allow is None else allow)
        self.syncs: list[SyncRecord] = []
        self.implicit_syncs: list[SyncRecord] = []
        self._outer: DeviceGuard | None = None

    def __enter__(self) -> DeviceGuard:
        global _ACTIVE
        self._outer, _ACTIVE = _ACTIVE, self
        self._constructors = _Constructors()
        self._constructors.__enter__()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _ACTIVE
        super().__exit__(*exc)
        self._constructors.__exit__(*exc)
        _ACTIVE = self._outer

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        return _dispatch(self, func, args, kwargs or {})

    def host_read(self, what: str) -> None:
        """Record an allowed host read of device values, or raise :class:`HostSyncError`."""
        where, line = _call_site()
        if where not in self.allow:
            raise HostSyncError(
                f"host sync in the device path: {what} at {line} (in {where}); allowed only in: "
                f"{', '.join(sorted(self.allow)) or 'nowhere'}"
            )
        self.syncs.append(SyncRecord(what, where, line))

    @property
    def sync_sites(self) -> list[str]:
        """``where`` of each allowed host read, in order."""
        return [s.where for s in self.syncs]

    @property
    def implicit_ops(self) -> list[str]:
        """``"op@where"`` of each implicit sync, in order."""
        return [f"{s.what}@{s.where}" for s in self.implicit_syncs]


_ACTIVE: DeviceGuard | None = None


class DeviceTensor(torch.Tensor):
    """CPU data (``.data_``) that reports :data:`DEVICE`; ops on it go through the active guard."""

    data_: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor) -> DeviceTensor:
        out = torch.Tensor._make_wrapper_subclass(
            cls, data.shape, strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            layout=data.layout, device=DEVICE, requires_grad=data.requires_grad,
        )  # fmt: skip
        out.data_ = data
        return out

    def __repr__(self) -> str:  # type: ignore[override]
        return f"DeviceTensor({self.data_!r})"

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.numpy, torch.Tensor.__array__):
            where, line = _call_site()
            raise HostSyncError(f".numpy() of a device tensor at {line} (in {where}): fails on CUDA")
        if func is torch.Tensor.tolist:
            if _ACTIVE is not None:
                _ACTIVE.host_read(".tolist()")
            return args[0].data_.tolist()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # Reached when no guard mode is on the stack: autograd's backward, or results used after the guard.
        return _dispatch(_ACTIVE, func, args, kwargs or {})


def host(tree: Any) -> Any:
    """``tree`` with every :class:`DeviceTensor` replaced by its CPU data (for assertions after the run)."""
    return tree_map(lambda x: x.data_ if isinstance(x, DeviceTensor) else x, tree)


@contextmanager
def no_guard() -> Iterator[None]:
    """Run set-up code (building a model, a dataset) without the checks; device tensors still compute."""
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, None
    try:
        yield
    finally:
        _ACTIVE = outer


def _call_site() -> tuple[str, str]:
    """``("path/in/atssdet.py:qualname", "file:line")`` of the innermost atssdet frame on the stack."""
    frame = sys._getframe(1)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(_PACKAGE):
            rel = path.relative_to(_PACKAGE).as_posix()
            # Python 3.12 inlines comprehensions (PEP 709): name them as their function on every version.
            qualname = _COMPREHENSION.sub("", frame.f_code.co_qualname)
            return f"{rel}:{qualname}", f"{path.name}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<outside atssdet>", "<outside atssdet>"


def _is_host_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and not isinstance(x, DeviceTensor) and x.dim() > 0


def _unwrap(x: Any) -> Any:
    if isinstance(x, DeviceTensor):
        return x.data_
    if isinstance(x, torch.Tensor) and x.device.type == DEVICE.type:
        raise AssertionError(
            "a real meta tensor (no data) reached the device guard: it was made by a constructor the guard "
            "does not intercept; extend tests/device_guard.py"
        )
    if isinstance(x, torch.device) and x.type == DEVICE.type:
        return _HOST
    return x


def _wrap(x: Any) -> Any:
    return DeviceTensor(x) if type(x) is torch.Tensor else x


def _transfer_target(func: Any, args: Any, kwargs: dict[str, Any]) -> torch.device | None:
    """The device a ``_to_copy``/``to`` call copies to (None: not a transfer, or no device change asked)."""
    if func in (_aten._to_copy.default, _aten.to.dtype_layout):
        target = kwargs.get("device")
    elif func is _aten.to.device:
        target = args[1]
    elif func is _aten.to.other:
        target = args[1].device
    else:
        return None
    return torch.device(target) if target is not None else None


def _dispatch(guard: DeviceGuard | None, func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """Run ``func`` on the CPU data; check device mixing and host reads when ``guard`` is active."""
    flat = tree_flatten((args, kwargs))[0]
    on_device = any(isinstance(x, DeviceTensor) for x in flat)
    target = _transfer_target(func, args, kwargs)
    if target is not None:
        return _transfer(guard, func, args, kwargs, target)
    to_device = any(isinstance(x, torch.device) and x.type == DEVICE.type for x in flat)  # a factory
    if guard is not None and on_device:
        _check(guard, func, args, flat)
    if not on_device and not to_device:
        return func(*args, **kwargs)
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if func is _aten._local_scalar_dense.default:
        return out
    if func is _aten.copy_.default and not isinstance(args[0], DeviceTensor):
        return args[0]  # copied into a host tensor
    return _results(func, args, kwargs, out)


def _results(func: Any, args: Any, kwargs: dict[str, Any], out: Any) -> Any:
    """``out`` (CPU data) as device tensors, aliasing their inputs as the op's schema says."""
    returns = func._schema.returns
    alias = returns[0].alias_info if len(returns) == 1 else None
    if not torch.is_inference_mode_enabled():
        return return_and_correct_aliasing(func, args, kwargs, tree_map(_wrap, out))
    if alias is not None and alias.is_write:  # in-place / out=: the tensor it wrote
        return kwargs.get("out", args[0])
    if alias is not None and isinstance(args[0], torch.Tensor) and not args[0].is_inference():
        # A view of a normal tensor is a normal tensor, also under inference_mode.
        with torch.inference_mode(False):
            return return_and_correct_aliasing(func, args, kwargs, tree_map(_wrap, out))
    return tree_map(_wrap, out)


def _transfer(
    guard: DeviceGuard | None, func: Any, args: Any, kwargs: dict[str, Any], target: torch.device
) -> Any:
    """``x.to(...)``: host -> device gives a new :class:`DeviceTensor`, device -> host a plain copy (a host read)."""
    src = args[0]
    from_device, to_device = isinstance(src, DeviceTensor), target.type == DEVICE.type
    if guard is not None and from_device and not to_device:
        guard.host_read(f"a copy to the host ({func}: .cpu() / .to('cpu'))")
    data = src.data_ if from_device else src
    out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
    if from_device and to_device and out is data:
        return src  # .to(DEVICE) of a device tensor: itself, as torch returns
    if out is data:  # torch returned its input (same device and dtype): a transfer must copy
        out = out.clone()
    return DeviceTensor(out) if to_device else out


class _Constructors(TorchFunctionMode):
    """``torch.tensor(data, device=DEVICE)`` and its kin build their tensor below the dispatcher (a real,
    data-less meta tensor): build it on the host and move it with ``.to``, which the guard sees."""

    _FUNCS = (torch.tensor, torch.as_tensor, torch.asarray)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if func in self._FUNCS and device is not None and torch.device(device).type == DEVICE.type:
            return func(*args, **{**kwargs, "device": _HOST}).to(DEVICE)
        if func is torch.Tensor.new_tensor and isinstance(args[0], DeviceTensor) and device is None:
            return torch.tensor(*args[1:], **{"dtype": args[0].dtype, **kwargs}).to(DEVICE)
        return func(*args, **kwargs)


def _check(guard: DeviceGuard, func: Any, args: Any, flat: list[Any]) -> None:
    name = str(func.overloadpacket).removeprefix("aten.")
    if func is _aten._local_scalar_dense.default:
        guard.host_read("item()/bool()/float()/int() of a device tensor (aten._local_scalar_dense)")
    elif func is _aten.copy_.default and not isinstance(flat[0], DeviceTensor):
        guard.host_read("a copy into a host tensor (copy_)")
    elif func not in _CROSS_DEVICE_OPS:
        host_args = [tuple(x.shape) for x in flat if _is_host_tensor(x)]
        if host_args:
            where, line = _call_site()
            raise DeviceMixError(
                f"{name} at {line} (in {where}) mixes device tensors with host tensor(s) of shape "
                f"{', '.join(map(str, host_args))}: create them on the device (device=...) or move them"
            )
    indexing = func in (_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default)
    bool_index = indexing and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if func in _IMPLICIT_SYNC_OPS or bool_index:
        where, line = _call_site()
        guard.implicit_syncs.append(SyncRecord(name, where, line))
