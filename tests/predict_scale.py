"""Shared set-up of the scale tests (streaming, resume, torchrun, Ray): a tiny random model, 200 small
generated images plus two bad files, and the reference detections of ``Detector.predict`` one image at
a time (computed once per pytest process). No test functions here."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from tests.coco_synth import TINY_CFG
from tests.helpers import assert_dets_match

NUM_IMAGES = 200
SHORT, MAX = 32, 64  # test resize: tiny inputs keep 200 images cheap
SIZE_ARGS = ["--short-size", str(SHORT), "--max-size", str(MAX), "--device", "cpu", "--no-progress"]
BAD_FILES = ("broken.jpg", "notes.txt")  # unreadable: become error records


@functools.lru_cache(maxsize=1)
def tiny_model() -> Any:
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    model = build_model(TINY_CFG).eval()
    with torch.no_grad():
        model.head.cls_score.bias.fill_(
            -5.3
        )  # scores around the 0.05 threshold: some images keep fewer than 100 boxes
    return model


def tiny_detector() -> Any:
    from atssdet.detector import Detector

    return Detector(tiny_model(), device="cpu", short_size=SHORT, max_size=MAX)


def write_weights(folder: Path) -> Path:
    from atssdet.convert import save_safetensors

    return save_safetensors(tiny_model().state_dict(), folder / "tiny.safetensors", cfg=TINY_CFG)


def write_images(folder: Path, n: int = NUM_IMAGES) -> Path:
    """``n`` noise images in three sizes (two padded sizes at 64/96) and the bad files, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = ((48, 64), (64, 48), (40, 70))[i % 3]
        ok, data = cv2.imencode(".png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert ok
        (folder / f"im{i:04d}.png").write_bytes(data.tobytes())
    (folder / BAD_FILES[0]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / BAD_FILES[1]).write_text("not an image\n")
    return folder


_REFERENCE: dict[str, np.ndarray] = {}  # sha256 of an image file -> its detections, once per process


def reference(folder: Path) -> dict[str, np.ndarray]:
    """``{path: [K, 6] detections}`` of ``Detector.predict`` on each image of ``folder`` alone; kept by
    file content, so the scale test modules (the same generated images) compute each image once."""
    det = tiny_detector()
    out = {}
    for p in sorted(p for p in folder.iterdir() if p.name not in BAD_FILES):
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        if digest not in _REFERENCE:
            _REFERENCE[digest] = det.predict([str(p)], batch_size=1)[0].to_array().numpy()
        out[str(p)] = _REFERENCE[digest]
    return out


def record_array(record: dict[str, Any]) -> np.ndarray:
    dets = record["detections"]
    return np.asarray([[*d["box"], d["score"], d["label"]] for d in dets], dtype=np.float64).reshape(-1, 6)


def read_jsonl(*paths: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]


def assert_records_match(records: list[dict[str, Any]], folder: Path) -> None:
    """Every image exactly once with the reference detections (same count, classes, order; boxes and
    scores within the documented 0.02 px / 1e-4), and each bad file as one error record."""
    ref = reference(folder)
    files = [str(r["file"]) for r in records]
    assert len(files) == len(set(files)), "an image is recorded twice"
    by_file = {str(r["file"]): r for r in records}
    assert set(by_file) == set(ref) | {str(folder / b) for b in BAD_FILES}
    for bad in BAD_FILES:
        record = by_file[str(folder / bad)]
        assert record["error"] and bad in record["error"] and record["detections"] == []
    counts = []
    for path, expected in ref.items():
        record = by_file[path]
        assert record["error"] is None, record["error"]
        assert_dets_match(record_array(record), expected, score_tol=1e-4, box_tol=0.02)
        counts.append(len(expected))
    assert max(counts) > 0 and min(counts) < 100, "the detections should vary between images"
