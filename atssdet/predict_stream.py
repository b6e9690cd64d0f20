"""The streaming outputs of ``atssdet predict``: one record per image, written as soon as it is done.

:class:`RecordSink` is the one place a finished image becomes output. It writes each record to
this process's *part* of the stream (JSON Lines, flushed per record; or Parquet, one complete file
per chunk of records) and skips images already recorded, so a killed job re-run into the same folder
continues with no duplicate and no gap. A format is a writer class in :data:`WRITERS` (``write``,
``close``); a new one plugs in there.

A record is keyed by the input's path, size and modification time (:func:`file_key`): a file changed
since it was recorded is done again. Parts: ``predictions.jsonl`` for one process,
``predictions.part-RRRRR-of-WWWWW.jsonl`` per rank under torchrun, ``predictions.parquet/*.parquet``.
:func:`merged_records` reads every part back in input order (memory flat), for ``predictions.json``
and the COCO files that :mod:`atssdet.predict` writes at the end.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from atssdet.fileio import atomic_path, close_stream, open_stream
from atssdet.structures import Detections

COMMAND = "predict"  # the written-by mark of predict's outputs (images, JSON, streams, videos)
FORMATS = ("jsonl", "parquet")
PARQUET_DIR = "predictions.parquet"
MANIFEST = "predictions.parts.json"

Key = tuple[str, int, int]  # (path, size in bytes, mtime_ns); (path, -1, -1) when it cannot be stat'ed


def file_key(path: str) -> Key:
    """What identifies the content of input ``path`` for resuming: its path, size and mtime."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return (path, -1, -1)
    return (path, int(st.st_size), int(st.st_mtime_ns))


def make_record(
    index: int, image_id: int, key: Key, result: Detections, drawn: Path | None
) -> dict[str, Any]:
    """The stream record of input ``index``: file, its key, image size, detections or the error."""
    record = result.to_dict()
    del record["source"]
    return {
        "index": index,
        "image_id": image_id,
        "file": key[0],
        "size": key[1],
        "mtime_ns": key[2],
        **record,
        "drawn": str(drawn) if drawn is not None else None,
    }


def record_key(record: dict[str, Any]) -> Key:
    return (str(record["file"]), int(record["size"]), int(record["mtime_ns"]))


def record_detections(record: dict[str, Any], class_names: Sequence[str]) -> Detections:
    """A record's detections as :class:`Detections` (float32 boxes/scores, as they were computed)."""
    import torch

    dets = record.get("detections") or []
    boxes = torch.tensor([d["box"] for d in dets], dtype=torch.float32).reshape(-1, 4)
    scores = torch.tensor([d["score"] for d in dets], dtype=torch.float32)
    labels = torch.tensor([d["label"] for d in dets], dtype=torch.int64)
    hw = (record["height"], record["width"]) if record.get("height") is not None else None
    return Detections(
        boxes, scores, labels, class_names=tuple(class_names), image_hw=hw, error=record.get("error")
    )


def part_path(out: Path, fmt: str, rank: int = 0, world_size: int = 1) -> Path:
    """This process's stream part (for Parquet: the folder its chunk files go into)."""
    if fmt == "parquet":
        return out / PARQUET_DIR
    if world_size == 1:
        return out / "predictions.jsonl"
    return out / f"predictions.part-{rank:05d}-of-{world_size:05d}.jsonl"


def stream_files(out: Path) -> list[Path]:
    """Every part of the stream in ``out`` (all formats, any earlier world size), sorted."""
    names = ["predictions.jsonl", *(p.name for p in out.glob("predictions.part-*-of-*.jsonl"))]
    parts = sorted(out / n for n in names if (out / n).is_file())
    folder = out / PARQUET_DIR
    if folder.is_dir():
        parts += sorted(p for p in folder.glob("*.parquet") if p.is_file())
    return parts


def read_part(path: Path) -> Iterator[dict[str, Any]]:
    """The records of one part; a line a writer is still writing (or a killed one left) is skipped."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from pq.read_table(path).to_pylist()
        return
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "file" in record:
                yield record


def recorded_keys(out: Path) -> set[Key]:
    """The keys of every image recorded in ``out``'s stream (what a resumed job skips)."""
    return {record_key(r) for part in stream_files(out) for r in read_part(part)}


def merged_records(out: Path, current: dict[str, tuple[int, Key]]) -> Iterator[dict[str, Any]]:
    """The stream's records of the inputs ``current`` (``{path: (index, key)}``), once each, in input
    order, with ``index`` set to the current position. Records of changed or dropped files are left
    out. Parts are merged lazily (each is in input order when the input list did not change between
    runs); otherwise the records are sorted in memory."""

    def current_records(part: Path) -> Iterator[dict[str, Any]]:
        for r in read_part(part):
            entry = current.get(str(r["file"]))
            if entry is not None and entry[1] == record_key(r):
                r["index"] = entry[0]
                yield r

    parts = stream_files(out)
    if all(_is_ascending(current_records(p)) for p in parts):  # a first pass that keeps nothing
        yield from _dedupe(heapq.merge(*(current_records(p) for p in parts), key=_index))
        return
    everything = sorted((r for p in parts for r in current_records(p)), key=_index)
    yield from _dedupe(iter(everything))


def _index(record: dict[str, Any]) -> int:
    return int(record["index"])


def _is_ascending(records: Iterator[dict[str, Any]]) -> bool:
    last = -1
    for r in records:
        if r["index"] < last:
            return False
        last = r["index"]
    return True


def _dedupe(records: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    last = -1
    for r in records:
        if r["index"] != last:
            last = r["index"]
            yield r


class JsonlPart:
    """One JSON Lines part: a record per line, flushed as it is written (see :func:`fileio.open_stream`)."""

    def __init__(self, out: Path, rank: int, world_size: int) -> None:
        self.path = part_path(out, "jsonl", rank, world_size)
        self._stream = open_stream(self.path, mark=COMMAND)

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record).encode() + b"\n")
        self._stream.flush()

    def close(self) -> None:
        close_stream(self._stream, self.path, mark=COMMAND)


class ParquetPart:
    """Parquet chunks (pyarrow): every ``chunk`` records or ``seconds``, one complete file, written
    atomically, so a killed job loses at most the chunk in progress (done again on resume)."""

    def __init__(
        self, out: Path, rank: int, world_size: int, chunk: int = 256, seconds: float = 30.0
    ) -> None:
        import pyarrow as pa

        self.folder = part_path(out, "parquet")
        self._prefix = f"part-{rank:05d}-of-{world_size:05d}-{time.time_ns():x}"
        self._buffer: list[dict[str, Any]] = []
        self._chunk, self._seconds, self._last = chunk, seconds, time.monotonic()
        self._seq = 0
        detection = pa.struct(
            [
                ("box", pa.list_(pa.float64())),
                ("score", pa.float64()),
                ("label", pa.int64()),
                ("name", pa.string()),
            ]
        )
        integers = ("index", "image_id", "size", "mtime_ns", "height", "width")
        self._schema = pa.schema(
            [(n, pa.int64()) for n in integers[:4]]
            + [("file", pa.string())]
            + [(n, pa.int64()) for n in integers[4:]]
            + [("error", pa.string()), ("detections", pa.list_(detection)), ("drawn", pa.string())]
        )

    def write(self, record: dict[str, Any]) -> None:
        self._buffer.append(record)
        if len(self._buffer) >= self._chunk or time.monotonic() - self._last >= self._seconds:
            self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._last = time.monotonic()
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=self._schema)
        path = self.folder / f"{self._prefix}-{self._seq:06d}.parquet"
        with atomic_path(path, suffix=".parquet", mark=COMMAND) as tmp:
            pq.write_table(table, tmp)
        self._seq += 1
        self._buffer = []


WRITERS: dict[str, type[JsonlPart] | type[ParquetPart]] = {"jsonl": JsonlPart, "parquet": ParquetPart}


class RecordSink:
    """Where each finished image goes: its record, once (``done`` keys and keys already written are
    skipped, so a re-run batch of a retried Ray task is not written twice). Use as a context manager."""

    def __init__(
        self, out: Path, fmt: str = "jsonl", *, rank: int = 0, world_size: int = 1, done: Iterable[Key] = ()
    ) -> None:
        if fmt not in WRITERS:
            raise ValueError(f"format {fmt!r}: not one of {', '.join(WRITERS)}")
        self._writer = WRITERS[fmt](out, rank, world_size)
        self._keys: set[Key] = done if isinstance(done, set) else set(done)  # a set given is used, not copied
        self.written = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._keys

    def write(self, record: dict[str, Any]) -> bool:
        """Write ``record`` unless its key is already there; True when written."""
        key = record_key(record)
        if key in self._keys:
            return False
        self._keys.add(key)
        self._writer.write(record)
        self.written += 1
        return True

    def close(self) -> None:
        self._writer.close()

    def __enter__(self) -> RecordSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
