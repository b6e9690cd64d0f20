"""Dynamic batching: one worker thread runs queued requests together, grouped by their options.

The worker takes the first waiting request, waits up to ``max_wait_ms`` for more (at most
``max_batch`` in all), and runs them together; requests that arrive while it computes are waiting
when it comes back, so batches grow with load. Requests with different :class:`InferenceOptions`
run as separate calls of the ``detect`` function, so each gets exactly the detections it would get
alone (the function itself groups images by padded size, see :mod:`atssdet.batching`). When a call
fails, each of its requests is run again alone, so one bad image fails only its own request.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from atssdet.options import InferenceOptions
from atssdet.structures import Detections

# Images (BGR uint8 [H_i, W_i, 3]) and the options they share -> one Detections per image, in order.
DetectFn = Callable[[list[np.ndarray], InferenceOptions], list[Detections]]


@dataclass(frozen=True)
class BatchResult:
    """What the worker returns for one request."""

    detections: Detections
    queue_ms: float  # from submission to the start of its batch
    inference_ms: float  # the whole detect call it was part of
    batch_size: int  # images in that call


@dataclass
class _Job:
    image: np.ndarray  # BGR uint8 [H, W, 3]
    options: InferenceOptions
    future: concurrent.futures.Future[BatchResult]
    submitted: float  # time.perf_counter()


class ServerBusy(RuntimeError):
    """The request queue is full."""


class DynamicBatcher:
    """One worker thread that owns the model (through ``detect``) and runs queued requests in batches.

    ``submit`` is thread-safe and returns a :class:`concurrent.futures.Future`; the worker collects up
    to ``max_batch`` requests, waiting at most ``max_wait_ms`` after the first for more, and calls
    ``detect(images, options)`` once per distinct options. When a call of several requests fails,
    each runs again alone: only the requests that fail alone get the exception; the worker keeps
    running. ``failures`` counts failed calls.
    """

    def __init__(
        self, detect: DetectFn, *, max_batch: int, max_wait_ms: float, max_queue: int = 1024
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.detect = detect
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.batches = 0
        self.requests = 0
        self.failures = 0

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Running, or not needed yet (it starts at the first request); False once stopped or dead."""
        return self.alive or (self._thread is None and not self._stopping)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def start(self) -> None:
        with self._lock:
            if self.alive:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="atssdet-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, fail the requests still queued, end the thread."""
        with self._lock:
            self._stopping = True
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("server is shutting down"))

    def submit(self, image: np.ndarray, options: InferenceOptions) -> concurrent.futures.Future[BatchResult]:
        """Queue ``image`` (BGR uint8 ``[H, W, 3]``); raises :class:`ServerBusy` when the queue is full."""
        if self._stopping:
            raise RuntimeError("server is shutting down")
        self.start()  # lazily, so an app driven without lifespan events (some test clients) works too
        future: concurrent.futures.Future[BatchResult] = concurrent.futures.Future()
        try:
            self._queue.put_nowait(_Job(image, options, future, time.perf_counter()))
        except queue.Full:
            raise ServerBusy(f"{self._queue.maxsize} requests already waiting; try again later") from None
        return future

    def _collect(self) -> tuple[list[_Job], bool]:
        """Block for one job, then take more until ``max_batch`` or the wait window ends; (jobs, stop)."""
        first = self._queue.get()
        if first is None:
            return [], True
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _run(self) -> None:
        while self._run_one_batch():
            pass

    def _run_one_batch(self) -> bool:
        """Collect and run one batch; False once stopping. Its images are unreferenced on return, so
        an idle worker holds no pixels."""
        jobs, stop = self._collect()
        # A request whose client went away was cancelled: skip it (and never set its result).
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        by_options: dict[InferenceOptions, list[_Job]] = {}
        for job in jobs:
            by_options.setdefault(job.options, []).append(job)
        for options, group in by_options.items():
            self._process(options, group)
        return not stop

    def _process(self, options: InferenceOptions, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            dets = self.detect([j.image for j in jobs], options)
        except Exception as exc:  # one bad batch must not end the worker
            self.failures += 1
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            for job in jobs:  # one bad image must not fail the others: each again, alone
                self._process(options, [job])
            return
        end = time.perf_counter()
        self.batches += 1
        self.requests += len(jobs)
        for job, d in zip(jobs, dets, strict=True):
            job.future.set_result(
                BatchResult(
                    detections=d,
                    queue_ms=(start - job.submitted) * 1000.0,
                    inference_ms=(end - start) * 1000.0,
                    batch_size=len(jobs),
                )
            )
