"""Data pipeline speed: COCODetection index build on a COCO-train2017-sized JSON (vs pycocotools.COCO),
synthetic image generation, and loading + training transform per image.

Run: python benchmarks/bench_data.py  (prints medians of repeated runs and ratios; nothing is asserted).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.data.coco import COCODetection  # noqa: E402
from atssdet.data.synth import generate_synthetic_dataset  # noqa: E402
from atssdet.data.transforms import TrainTransform  # noqa: E402
from benchmarks.common import median_time  # noqa: E402


def _coco_like_json(path: Path, num_images: int, anns_per_image: float, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    cat_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
    images = [
        {"id": int(i), "file_name": f"{i:012d}.jpg", "height": 480, "width": 640}
        for i in range(1, num_images + 1)
    ]
    n = int(num_images * anns_per_image)
    xy = rng.uniform(0, 400, (n, 2)).round(2)
    wh = rng.uniform(0, 200, (n, 2)).round(2)
    img = rng.integers(1, num_images + 1, n)
    cat = rng.choice(cat_ids, n)
    crowd = (rng.random(n) < 0.01).astype(int)
    anns = [
        {"id": k + 1, "image_id": int(img[k]), "category_id": int(cat[k]), "iscrowd": int(crowd[k]),
         "bbox": [float(xy[k, 0]), float(xy[k, 1]), float(wh[k, 0]), float(wh[k, 1])], "area": 1.0}
        for k in range(n)
    ]  # fmt: skip
    cats = [{"id": c, "name": f"c{c}"} for c in cat_ids]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return n


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    from pycocotools.coco import COCO

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        ann = tmpdir / "instances.json"
        num_images = 118_287
        n = _coco_like_json(ann, num_images, 7.3)
        print(
            f"index build, {num_images} images / {n} annotations ({ann.stat().st_size / 1e6:.0f} MB JSON), median of 3:"
        )

        def load_ours() -> None:
            COCODetection(ann, tmpdir, remove_images_without_annotations=True)

        def load_pycocotools() -> None:
            with contextlib.redirect_stdout(io.StringIO()):
                COCO(str(ann))

        # Interleaved so that load from other processes hits both alike.
        ours, ref = [], []
        for _ in range(3):
            ours.append(median_time(load_ours, repeats=1, warmup=0))
            ref.append(median_time(load_pycocotools, repeats=1, warmup=0))
        t_ours, t_ref = statistics.median(ours), statistics.median(ref)
        print(f"  COCODetection          {t_ours:6.2f} s")
        print(f"  pycocotools.COCO       {t_ref:6.2f} s   (ours / pycocotools = {t_ours / t_ref:.2f})")

        count = 100
        runs = iter(range(100))
        t_gen = median_time(
            lambda: generate_synthetic_dataset(
                tmpdir / f"synth{next(runs)}", num_train=count, num_val=0, progress=False, log=lambda _: None
            ),
            repeats=3,
            warmup=0,
        )
        print(f"synthetic generation (256-384 px, PNG): {count / t_gen:.0f} images/s (median of 3 x {count})")
        out = generate_synthetic_dataset(
            tmpdir / "synth", num_train=count, num_val=0, progress=False, log=lambda _: None
        )
        ds = COCODetection(
            out.train_ann,
            out.train_images,
            remove_images_without_annotations=True,
            transform=TrainTransform(short_sizes=(640, 672, 704, 736, 768, 800), max_size=1333),
        )
        t_load = median_time(lambda: [ds[(i, i)] for i in range(len(ds))], repeats=3, warmup=0)
        print(f"read + train transform (to 640-800 short side): {1000 * t_load / len(ds):.1f} ms/image")


if __name__ == "__main__":
    main()
