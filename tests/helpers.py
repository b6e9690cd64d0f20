"""Shared assertions for tests."""

from __future__ import annotations

import hashlib
import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def sigkill_when(
    proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300.0
) -> None:
    """SIGKILL ``proc`` (started with ``stderr=PIPE, text=True``) as soon as ``ready()`` holds; fail
    naming ``what`` if it exits first or ``timeout`` seconds pass. Always reaps it and closes stderr."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, (
                f"exited ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def snapshot_files(folder: str | os.PathLike[str]) -> dict[str, str]:
    """``{relative path: sha256 of the bytes}`` of every file below ``folder``: compare before and after
    a command to prove it replaced, changed or deleted nothing (new files show up as new keys)."""
    root = Path(folder)
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                out[str(p.relative_to(root))] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian TIFF (no pixel data) whose IFD declares ``width x height`` grey pixels."""
    tags = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (273, 8), (277, 1), (278, height)]
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHII", t, 4, 1, v) for t, v in tags)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def assert_dets_match(
    ours: np.ndarray, ref: np.ndarray, *, score_tol: float = 1e-4, box_tol: float = 0.02
) -> None:
    """``[K, 6]`` detections: same count, classes and order; boxes within ``box_tol`` px, scores within ``score_tol``.

    Rows whose reference scores are closer than ``score_tol`` form a tie group: float32 results from
    different kernels differ by ~1e-5, so the order inside such a group is not defined by the
    tolerance and is compared as a set. Every other position must match in order.
    """
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    start = 0
    n = ref.shape[0]
    while start < n:
        end = start + 1
        while end < n and abs(ref[end - 1, 4] - ref[end, 4]) < score_tol:
            end += 1
        remaining = list(range(start, end))
        for r in range(start, end):
            match = [
                i
                for i in remaining
                if ours[i, 5] == ref[r, 5]
                and np.abs(ours[i, :4] - ref[r, :4]).max() <= box_tol
                and abs(ours[i, 4] - ref[r, 4]) <= score_tol
            ]
            assert match, f"reference row {r} {ref[r]} has no match in rows {start}..{end - 1}"
            remaining.remove(match[0])
        start = end
