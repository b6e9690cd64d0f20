"""What a training run tells its user: ``train_log.jsonl``, a progress bar with ETA, console lines.

Only rank 0 writes; on other ranks a :class:`TrainLog` accepts every call and does nothing visible.
JSONL records: one ``{"event": "start", ...}``, then one per logged iteration (``iteration``, the
losses, ``lr``, ``time``, ``data_time``, ``eta``, ``eta_s``, ``max_mem_mb``, ``skipped_images``),
``{"event": "checkpoint", ...}`` and ``{"event": "eval", "bbox/AP": ...}``. With
:class:`~atssdet.training.loggers.LoggerOptions` the same numbers also go to TensorBoard / MLflow.
"""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atssdet.config import ATSSConfig

if TYPE_CHECKING:
    from atssdet.training.checkpoint import Resume
    from atssdet.training.device import DeviceOptions
    from atssdet.training.loggers import LoggerOptions, Sink

LOG_NAME = "train_log.jsonl"


def max_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's peak resident set on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - non-POSIX
        return float("nan")


def format_eta(seconds: float) -> str:
    """``H:MM:SS``."""
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def start_record(
    cfg: ATSSConfig,
    *,
    iteration: int,
    max_iters: int,
    batch_size: int,
    world_size: int,
    opts: DeviceOptions,
    resume: Resume | None,
    num_images: int,
) -> dict[str, Any]:
    """The run's first JSONL record: layout, device, where it resumed from, the whole config."""
    layout = None
    if resume is not None and resume.layout_changed:
        layout = {
            "world_size": resume.saved_layout[0],
            "batch_size": resume.saved_layout[1],
            "iteration": resume.saved_iteration,
        }
    return {
        "event": "start",
        "iteration": iteration,
        "max_iters": max_iters,
        "world_size": world_size,
        "batch_size": batch_size,
        "global_batch": batch_size * world_size,
        "device": str(opts.device),
        "amp": opts.amp,
        "channels_last": opts.channels_last,
        "compile": opts.compile,
        "cudnn_benchmark": opts.cudnn_benchmark,
        "resumed_from": str(resume.path) if resume is not None else None,
        "resumed_layout": layout,
        "num_images": num_images,
        "config": json.loads(cfg.to_json()),
    }


class TrainLog:
    """The JSONL log (``path``; None on ranks > 0), the progress bar and console lines of one run.

    ``step`` records every ``log_every``-th iteration, the first and the last; the ETA is the mean
    time of the last 20 iterations times the iterations left.
    """

    def __init__(
        self, path: Path | None, *, start: int, end: int, log_every: int, progress: bool, device: torch.device,
        loggers: LoggerOptions | None = None,
    ) -> None:  # fmt: skip
        self.main = path is not None
        self.loggers = loggers
        self.sinks: list[Sink] = []
        self.global_batch = 1
        if path is not None and loggers is not None:
            from atssdet.training.loggers import open_sinks

            self.sinks = open_sinks(loggers, path.parent)
        self.file = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115
        self.start, self.end, self.log_every, self.device = start, end, log_every, device
        self.bar = None
        if progress and self.main:
            from tqdm import tqdm

            self.bar = tqdm(total=end, initial=start, desc="train", unit="it", dynamic_ncols=True)
        self.step_times: collections.deque[float] = collections.deque(maxlen=20)
        self.t_last = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        """Append one JSON object as a line, flushed at once (a crash loses nothing logged)."""
        if self.file is not None:
            self.file.write(json.dumps(record, sort_keys=False) + "\n")
            self.file.flush()
        if record.get("event") == "start" and self.sinks:
            from atssdet.training.loggers import flat_params

            self.global_batch = int(record.get("global_batch", 1))
            for sink in self.sinks:
                sink.params(flat_params(record))

    def say(self, msg: str) -> None:
        """A console line (above the progress bar when there is one)."""
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, record: dict[str, Any], *, data_time: float, skipped_images: int) -> None:
        """After iteration ``record["iteration"]`` (1-based; ``record`` holds the losses and ``lr``)."""
        done = int(record["iteration"])
        now = time.perf_counter()
        iter_time, self.t_last = now - self.t_last, now
        self.step_times.append(iter_time)
        eta = sum(self.step_times) / len(self.step_times) * (self.end - done)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['total_loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
            self.bar.update(1)
        if not self.main or not (done % self.log_every == 0 or done == self.end or done == self.start + 1):
            return
        logged = {
            **record,
            "time": round(iter_time, 4),
            "data_time": round(data_time, 4),
            "eta": format_eta(eta),
            "eta_s": round(eta, 1),
            "max_mem_mb": round(max_memory_mb(self.device), 1),
            "skipped_images": skipped_images,
        }
        self.write(logged)
        if self.sinks:
            from atssdet.training.loggers import step_scalars

            for sink in self.sinks:
                sink.scalars(done, step_scalars(logged, self.global_batch))
        if self.bar is None:
            self.say(
                f"iter {done}/{self.end} loss {record['total_loss']:.4f} (cls {record['loss_cls']:.4f} bbox "
                f"{record['loss_bbox']:.4f} ctr {record['loss_ctr']:.4f}) lr {record['lr']:.3g} "
                f"{iter_time:.3f}s/it data {data_time:.3f}s eta {format_eta(eta)}"
            )

    def checkpoint(self, iteration: int, path: Path) -> None:
        self.write({"event": "checkpoint", "iteration": iteration, "path": str(path)})

    def evaluation(self, iteration: int, stats: dict[str, float]) -> None:
        self.write({"event": "eval", "iteration": iteration, **{f"bbox/{k}": v for k, v in stats.items()}})
        self.say(f"iter {iteration}: val AP {stats['AP']:.4f} AP50 {stats['AP50']:.4f}")
        if self.sinks and self.loggers is not None and self.file is not None:
            from atssdet.training.loggers import log_validation

            log_validation(self.sinks, self.loggers, Path(self.file.name).parent, iteration, stats)

    def __enter__(self) -> TrainLog:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """Close; the experiment trackers record how the run ended (an MLflow run ends FAILED/KILLED)."""
        failed = kind is not None and not issubclass(kind, KeyboardInterrupt)
        self.close("FAILED" if failed else "KILLED" if kind is not None else "FINISHED")

    def close(self, status: str = "FINISHED") -> None:
        for sink in self.sinks:
            sink.close(status)
        self.sinks = []
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
