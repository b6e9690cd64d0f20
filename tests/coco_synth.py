"""Tiny synthetic COCO-format splits and fake detectors for the evaluation tests (no test functions here).

Also the entry points of processes spawned by the distributed tests (they must be importable by
name, and cheap to import).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from atssdet.config import ATSSConfig

# A small ATSS model over the split's 3 classes: res18 backbone, thin FPN/head, short side 96.
TINY_CFG = ATSSConfig(
    backbone="resnet18",
    fpn_in_channels=(128, 256, 512),
    fpn_out_channels=32,
    fpn_top_in_channel=32,
    head_num_convs=1,
    head_norm_groups=8,
    num_classes=3,
    class_names=("cat", "dog", "bird"),
    test_image_short_size=96,
    test_image_max_size=160,
)

# Non-contiguous category ids on purpose: labels 0, 1, 2 are ids 3, 7, 12 (sorted id order).
CATEGORIES = [{"id": 12, "name": "bird"}, {"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
CAT_IDS = [3, 7, 12]

# (file_name, id, height, width, [(category_id, x, y, w, h, iscrowd)]). Ids are not derivable from
# the file names and not in file order; areas cover small (< 32^2), medium and large (>= 96^2).
IMAGES: list[tuple[str, int, int, int, list[tuple[int, float, float, float, float, int]]]] = [
    ("b.png", 42, 96, 128, [(3, 10, 12, 20, 18, 0), (7, 40, 30, 50, 40, 0)]),
    ("street view.jpg", 7, 150, 120, [(12, 5, 8, 100, 110, 0), (3, 70, 100, 30, 30, 0)]),
    ("c/a.png", 1001, 80, 160, [(7, 20, 10, 60, 50, 0), (7, 90, 20, 40, 40, 1)]),
    ("z.png", 5, 64, 64, [(12, 4, 4, 16, 12, 0)]),
    ("y.jpeg", 300, 120, 100, [(3, 10, 10, 60, 70, 0), (12, 50, 60, 40, 50, 0), (7, 0, 0, 12, 10, 0)]),
]


def write_split(root: Path, images: list[Any] | None = None) -> tuple[Path, Path]:
    """Write the images (noise) and ``annotations.json`` under ``root``; returns (ann_file, image_dir)."""
    images = IMAGES if images is None else images
    image_dir = root / "images"
    rng = np.random.default_rng(0)
    records, annotations = [], []
    ann_id = 1
    for file_name, image_id, h, w, objects in images:
        path = image_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        ok, data = cv2.imencode(
            path.suffix if path.suffix != ".jpeg" else ".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        )
        assert ok
        path.write_bytes(data.tobytes())
        records.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for cat, x, y, bw, bh, crowd in objects:
            annotations.append(
                {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
                 "area": bw * bh, "iscrowd": crowd}
            )  # fmt: skip
            ann_id += 1
    ann_file = root / "annotations.json"
    ann_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": CATEGORIES}))
    return ann_file, image_dir


def crafted_results() -> list[dict[str, Any]]:
    """Known detections: perfect, shifted, false positives, wrong class, a duplicate, one on the crowd box."""
    return [
        {"image_id": 42, "category_id": 3, "bbox": [10, 12, 20, 18], "score": 0.95},  # perfect, small
        {"image_id": 42, "category_id": 7, "bbox": [45, 33, 50, 40], "score": 0.80},  # shifted, medium
        {"image_id": 42, "category_id": 7, "bbox": [40, 30, 50, 40], "score": 0.30},  # perfect but late
        {"image_id": 42, "category_id": 12, "bbox": [0, 0, 30, 30], "score": 0.70},  # false positive
        {"image_id": 7, "category_id": 12, "bbox": [8, 10, 100, 110], "score": 0.90},  # shifted, large
        {"image_id": 7, "category_id": 7, "bbox": [70, 100, 30, 30], "score": 0.60},  # wrong class
        {"image_id": 1001, "category_id": 7, "bbox": [20, 10, 60, 50], "score": 0.85},  # perfect
        {"image_id": 1001, "category_id": 7, "bbox": [92, 22, 36, 36], "score": 0.75},  # on the crowd box
        {"image_id": 5, "category_id": 12, "bbox": [6, 5, 16, 12], "score": 0.40},  # shifted, small
        {"image_id": 300, "category_id": 3, "bbox": [12, 14, 58, 66], "score": 0.88},  # near, medium
        {"image_id": 300, "category_id": 12, "bbox": [50, 60, 40, 50], "score": 0.55},  # perfect
        {"image_id": 300, "category_id": 12, "bbox": [52, 61, 40, 50], "score": 0.50},  # duplicate
        {"image_id": 300, "category_id": 3, "bbox": [60, 0, 30, 30], "score": 0.20},  # false positive
    ]


def fake_detector(images: list[np.ndarray]) -> list[Any]:
    """A deterministic stand-in detector: knows each image by its (distinct) size, returns shifted gt + a false positive."""
    import torch

    from atssdet.structures import Detections

    by_size = {(h, w): objects for _, _, h, w, objects in IMAGES}
    out = []
    for image in images:
        objects = [o for o in by_size[image.shape[:2]] if not o[5]]
        boxes = [[x + 1.5 * k, y + k, x + w + 1.5 * k, y + h] for k, (_, x, y, w, h, _) in enumerate(objects)]
        boxes.append([1.0, 2.0, 21.0, 30.0])
        labels = [CAT_IDS.index(o[0]) for o in objects] + [len(objects) % 3]
        scores = [0.9 - 0.1 * k for k in range(len(objects))] + [0.65]
        out.append(
            Detections(
                torch.tensor(boxes, dtype=torch.float32),
                torch.tensor(scores, dtype=torch.float32),
                torch.tensor(labels, dtype=torch.int64),
            )
        )
    return out


def assert_same_detections(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Same detections per image up to float rounding (boxes 1e-3 px, scores 1e-5), in any order.

    Different kernels (batch sizes, thread counts) round differently, which can swap near-tied rows.
    """
    assert len(got) == len(expected)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for g in got:
        by_image.setdefault(g["image_id"], []).append(g)
    for e in expected:
        candidates = by_image.get(e["image_id"], [])
        match = next(
            (
                g
                for g in candidates
                if g["category_id"] == e["category_id"]
                and g["score"] == pytest.approx(e["score"], abs=1e-5)
                and g["bbox"] == pytest.approx(e["bbox"], abs=1e-3)
            ),
            None,
        )
        assert match is not None, f"no match for {e}"
        candidates.remove(match)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _torchrun_env(rank: int, world_size: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip


def eval_worker(
    rank: int, world_size: int, port: int, ann_file: str, image_dir: str, out: str, result_file: str
) -> None:
    """Spawned rank: join a gloo group the way torchrun would, evaluate the fake detector, save the report.

    Then rank 1 exits without leaving the group and rank 0 records what its next collective does.
    """
    _torchrun_env(rank, world_size, port)
    from atssdet import distributed
    from atssdet.evaluation import evaluate

    distributed.init_distributed(device="cpu", timeout=30)
    report = evaluate(fake_detector, ann_file, image_dir, batch_size=2, device="cpu", out=out, progress=False)
    Path(f"{result_file}.{rank}").write_text(json.dumps(report.to_dict(), allow_nan=True))
    distributed.barrier()
    if rank == 1:
        os._exit(0)
    _record_collective(f"{result_file}.after_exit")


def timeout_worker(rank: int, world_size: int, port: int, timeout: float, result_file: str) -> None:
    """Spawned rank: rank 1 hangs (alive, never joins the collective); rank 0 records what happens to it."""
    _torchrun_env(rank, world_size, port)
    from atssdet import distributed

    distributed.init_distributed(device="cpu", timeout=timeout)
    if rank == 1:
        time.sleep(120)  # the test terminates this process
        os._exit(0)
    _record_collective(result_file)


def _record_collective(result_file: str) -> None:
    from atssdet import distributed

    start = time.monotonic()
    try:
        distributed.all_gather_object({"rank": distributed.get_rank()})
        outcome: dict[str, Any] = {"error": None, "type": None}
    except distributed.DistributedError as exc:
        outcome = {"error": str(exc), "type": type(exc).__name__}
    except Exception as exc:  # a different exception type is a test failure, recorded for the message
        outcome = {"error": traceback.format_exc(), "type": type(exc).__name__}
    outcome["elapsed_s"] = time.monotonic() - start
    Path(result_file).write_text(json.dumps(outcome))
    os._exit(0)  # skip process-group teardown with a dead peer
