"""Small helpers over ``torch.distributed`` for jobs launched by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them. Without them (plain ``python``) everything here degrades to a
single process: rank 0 of 1, gathers return ``[obj]``, barriers return at once.

Every process group gets a timeout so that a rank that died or hangs makes the others fail with a
:class:`DistributedError` after ``timeout`` seconds instead of waiting forever.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

# Collectives wait for the slowest rank; in evaluation that is the imbalance between shards, so the
# default must comfortably exceed it (torch's own gloo default is 30 minutes too).
DEFAULT_TIMEOUT_S: float = 1800.0

_timeout_s: float = DEFAULT_TIMEOUT_S


class DistributedError(RuntimeError):
    """A collective failed or timed out; the message names this rank and the likely cause."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset, e.g. plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` or ``cuda`` when available else ``cpu``; a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r}: not a valid device (cpu, cuda, cuda:N, ...)") from exc
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
    if dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and dev.index is None and env_world_size() > 1:
        dev = torch.device("cuda", local_rank())
    return dev


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA devices (GPU-direct collectives), gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(
    *,
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> DistInfo:
    """Join the process group torchrun describes (no-op for a single process or when already joined).

    The backend is NCCL when ``device`` resolves to CUDA (the CUDA device is set to ``LOCAL_RANK``)
    and gloo on CPU, unless ``backend`` says otherwise. ``timeout`` (seconds) bounds every collective.
    """
    global _timeout_s
    if dist.is_available() and dist.is_initialized():
        return info()
    if env_world_size() <= 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    dev = resolve_device(device)
    if backend is None:
        backend = default_backend(dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    _timeout_s = float(timeout)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
    return info()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def info() -> DistInfo:
    if not is_distributed():
        return DistInfo(rank=0, world_size=1, local_rank=0, backend=None)
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank(),
        backend=str(dist.get_backend()),
    )


def collective_error(what: str, exc: BaseException) -> DistributedError:
    """The error to raise when collective ``what`` failed with ``exc`` (names this rank, the timeout)."""
    return DistributedError(
        f"rank {get_rank()} of {get_world_size()}: {what} failed; another rank probably exited or is "
        f"stuck (collective timeout {_timeout_s:g} s): {type(exc).__name__}: {exc}"
    )


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except (RuntimeError, dist.DistError) as exc:
        raise collective_error("all_gather_object", exc) from exc
    return out


def broadcast_object(obj: T, *, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    try:
        dist.broadcast_object_list(box, src=src)
    except (RuntimeError, dist.DistError) as exc:
        raise collective_error("broadcast_object", exc) from exc
    return box[0]


def all_reduce_sum(values: torch.Tensor, *, what: str = "all_reduce") -> torch.Tensor:
    """``values`` summed over ranks, in place (returned as is when not distributed); ``what`` names it in errors."""
    if not is_distributed():
        return values
    try:
        dist.all_reduce(values)
    except (RuntimeError, dist.DistError) as exc:
        raise collective_error(what, exc) from exc
    return values


def barrier() -> None:
    if not is_distributed():
        return
    try:
        dist.barrier()
    except (RuntimeError, dist.DistError) as exc:
        raise collective_error("barrier", exc) from exc


def cleanup() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(items: list[T], *, rank: int | None = None, world_size: int | None = None) -> list[T]:
    """This rank's share ``items[rank::world_size]``: every item in exactly one shard, sizes differ by <= 1."""
    r = get_rank() if rank is None else rank
    w = get_world_size() if world_size is None else world_size
    return items[r::w]
