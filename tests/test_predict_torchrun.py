"""`torchrun --nproc_per_node=2 -m atssdet predict` (gloo, CPU): each rank streams its own part of a
deterministic split, the final listing names both parts, and every image is there once with the
detections of ``Detector.predict`` image by image (acceptance 1, torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from atssdet.distributed import shard
from tests.conftest import REPO_ROOT
from tests.predict_scale import (
    BAD_FILES,
    NUM_IMAGES,
    SIZE_ARGS,
    assert_records_match,
    read_jsonl,
    write_images,
    write_weights,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_torchrun_two_ranks_stream_their_parts(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images")
    weights = write_weights(tmp_path)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "atssdet", "predict", str(images), "--weights", str(weights), "--out", str(out),
         "--no-draw", "--batch-size", "2", *SIZE_ARGS],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("image(s) done") == 1  # rank 0 prints the table
    parts = [out / f"predictions.part-0000{r}-of-00002.jsonl" for r in range(2)]
    listing = json.loads((out / "predictions.parts.json").read_text())
    assert listing["parts"] == [p.name for p in parts]
    assert listing["images"] == NUM_IMAGES and listing["failed"] == len(BAD_FILES)
    files = sorted(str(p) for p in images.iterdir())
    for rank, part in enumerate(parts):  # the split: rank r takes files[r::2], in order
        assert [r["file"] for r in read_jsonl(part)] == shard(files, rank=rank, world_size=2)
    assert_records_match(read_jsonl(*parts), images)
    doc = json.loads((out / "predictions.json").read_text())
    assert [im["image_id"] for im in doc["images"]] == [
        i + 1 for i, f in enumerate(files) if Path(f).name not in BAD_FILES
    ]
