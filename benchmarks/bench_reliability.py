"""Cost of the reliability checks: ``decode_image`` (header check, truncation check) vs bare
``cv2.imdecode``; ``check_dataset`` (the schema plus its warning passes) vs the strict ``COCODetection`` index
on the same JSON; ``data check`` image reading with 1 and 2 threads.

Run: python benchmarks/bench_reliability.py  (medians of repeated interleaved runs and ratios; nothing asserted).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.data.check import check_dataset  # noqa: E402
from atssdet.data.coco import COCODetection  # noqa: E402
from atssdet.data.image_io import decode_image  # noqa: E402
from atssdet.data.synth import generate_synthetic_dataset  # noqa: E402
from benchmarks.bench_data import _coco_like_json  # noqa: E402
from benchmarks.common import interleaved_medians, machine_line  # noqa: E402


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    print(machine_line())
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8), (7, 7), 2)
    for ext in (".jpg", ".png"):
        data = cv2.imencode(ext, image)[1].tobytes()
        buf = np.frombuffer(data, np.uint8)
        peers = {
            "decode_image": lambda data=data: decode_image(data),
            "cv2.imdecode": lambda buf=buf: cv2.imdecode(buf, cv2.IMREAD_COLOR),
        }
        # Both orders, the lower median of each: the first peer of a round pays for cold caches.
        forward = interleaved_medians(peers, repeats=100, warmup=10)
        backward = interleaved_medians(dict(reversed(peers.items())), repeats=100, warmup=10)
        t = {k: min(forward[k], backward[k]) for k in peers}
        print(
            f"640x480 {ext}: decode_image {t['decode_image'] * 1e3:.2f} ms, cv2.imdecode "
            f"{t['cv2.imdecode'] * 1e3:.2f} ms, ratio {t['decode_image'] / t['cv2.imdecode']:.3f}"
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ann = root / "instances.json"
        num_images = 20_000
        n = _coco_like_json(ann, num_images, 7.3)
        t = interleaved_medians(
            {
                "COCODetection": lambda: COCODetection(ann, root, remove_images_without_annotations=True),
                "check_dataset": lambda: check_dataset(ann, None),
            },
            repeats=3,
        )
        print(
            f"{num_images} images / {n} annotations: COCODetection {t['COCODetection']:.2f} s, "
            f"check_dataset (no files) {t['check_dataset']:.2f} s, ratio "
            f"{t['check_dataset'] / t['COCODetection']:.2f}"
        )

        out = generate_synthetic_dataset(
            root / "synth", num_train=96, num_val=0, seed=0, image_size=(256, 384), image_format="jpg",
            force=False, progress=False,
        )  # fmt: skip
        t = interleaved_medians(
            {
                "1 thread": lambda: check_dataset(out.train_ann, out.train_images, num_workers=1),
                "2 threads": lambda: check_dataset(out.train_ann, out.train_images, num_workers=2),
                "no images": lambda: check_dataset(out.train_ann, out.train_images, read_images=False),
            },
            repeats=5,
        )
        print(
            "data check of 96 synthetic 256-384 px JPEGs: "
            + ", ".join(f"{k} {v * 1e3:.0f} ms ({96 / v:.0f} img/s)" for k, v in t.items())
            + f"; 2 threads / 1 thread = {t['2 threads'] / t['1 thread']:.2f}"
        )


if __name__ == "__main__":
    main()
