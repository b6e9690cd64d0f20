"""Inference at scale: images/s of `atssdet predict` in 1 process, with --workers 1, under torchrun
with 2 processes and with Ray (2 actors), on the same images in one run; and the memory of a long job.

    python benchmarks/bench_predict_scale.py                         # throughput, 4 peers
    python benchmarks/bench_predict_scale.py --images 400 --repeats 3
    python benchmarks/bench_predict_scale.py --memory --memory-images 5000   # RSS at image 500 vs 5000

Throughput: ``--images`` JPEGs of ``--height`` x ``--width`` (noise), an ATSS-R18 with random weights
(a fixed seed) saved as .safetensors, tested at ``--short-size``/``--max-size``; each peer is the
``atssdet predict ... --no-draw`` command a user types (so start-up is included: torch import, model
load, for Ray the local cluster and its actors), run round-robin ``--repeats`` times; the median wall
time per peer gives images/s, with ratios to the 1-process run. Ray runs in a fresh local instance
tiny PNGs with a tiny model; the resident set size (/proc/self/statm) at image 500 and at the last.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _write_images(folder: Path, n: int, h: int, w: int, ext: str = ".jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        image = np.roll(base, i * 7, axis=1)  # distinct files, same size
        ok, data = cv2.imencode(ext, image)
        assert ok
        (folder / f"img{i:05d}{ext}").write_bytes(data.tobytes())


def _weights(folder: Path, cfg: object) -> Path:
    import torch

    from atssdet.convert import save_safetensors
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():  # scores of a trained model's order (~30 candidates per image), not of noise
        model.head.cls_score.bias.fill_(-7.0)
    return save_safetensors(model.state_dict(), folder / "model.safetensors", cfg=cfg)


def _peers(args: argparse.Namespace, images: Path, weights: Path, root: Path) -> dict[str, list[str]]:
    common = [
        "predict", str(images), "--weights", str(weights), "--no-draw", "--no-progress", "--device", "cpu",
        "--short-size", str(args.short_size), "--max-size", str(args.max_size),
    ]  # fmt: skip
    py = [sys.executable, "-m"]
    torchrun = [*py, "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "atssdet"]
    return {
        "1 process": [*py, "atssdet", *common, "--out", str(root / "p1")],
        "--workers 1": [*py, "atssdet", *common, "--workers", "1", "--out", str(root / "w1")],
        "torchrun x2": [*torchrun, *common, "--out", str(root / "tr")],
        "ray, 2 actors": [
            *py,
            "atssdet",
            *common,
            "--engine",
            "ray",
            "--concurrency",
            "2",
            "--out",
            str(root / "ray"),
        ],
    }


def throughput(args: argparse.Namespace) -> None:
    from atssdet.config import PRESETS

    root = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        _write_images(root / "images", args.images, args.height, args.width)
        weights = _weights(root, PRESETS["atss_res18_coco_3x_800size"])
        peers = _peers(args, root / "images", weights, root)
        if not args.ray:
            peers.pop("ray, 2 actors")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        times: dict[str, list[float]] = {k: [] for k in peers}
        for _ in range(args.repeats):
            for name, cmd in peers.items():
                out = Path(cmd[cmd.index("--out") + 1])
                shutil.rmtree(out, ignore_errors=True)  # a fresh job each time (no resume)
                start = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                times[name].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
                print(f"    {name}: {times[name][-1]:.1f} s", flush=True)
        print(f"{args.images} images {args.width}x{args.height} JPEG, ATSS-R18 at {args.short_size}/{args.max_size}, "
              f"CPU, {os.cpu_count()} cores; median of {args.repeats} (start-up included)")  # fmt: skip
        base = statistics.median(times["1 process"])
        for name, ts in times.items():
            t = statistics.median(ts)
            print(f"  {name:14s} {args.images / t:7.2f} images/s  ({t:6.1f} s)  {base / t:5.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory(args: argparse.Namespace) -> None:
    import torch

    from atssdet.config import ATSSConfig
    from atssdet.detector import Detector
    from atssdet.modeling.atss import build_model
    from atssdet.predict import predict_files

    torch.set_num_threads(1)
    cfg = ATSSConfig(
        backbone="resnet18", fpn_in_channels=(128, 256, 512), fpn_out_channels=32, fpn_top_in_channel=32,
        head_num_convs=1, head_norm_groups=8, num_classes=3, class_names=("a", "b", "c"),
    )  # fmt: skip
    torch.manual_seed(0)
    det = Detector(build_model(cfg).eval(), device="cpu", short_size=32, max_size=64)
    root = Path(tempfile.mkdtemp(prefix="bench_scale_mem_"))
    samples: dict[int, float] = {}
    seen = [0]
    detect = det.runner.detect

    def counting(batch, *a, **k):  # type: ignore[no-untyped-def]
        seen[0] += batch.shape[0]
        if seen[0] in (500, args.memory_images) or seen[0] % 1000 == 0:
            samples[seen[0]] = _rss_mb()
        return detect(batch, *a, **k)

    det.runner.detect = counting  # type: ignore[method-assign]
    try:
        _write_images(root / "images", args.memory_images, 32, 40, ext=".png")
        start = time.perf_counter()
        predict_files([str(root / "images")], detector=det, out_dir=root / "out", draw=False, progress=False)
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"predict over {args.memory_images} images (32x40 PNG, tiny model, 1 thread) in {seconds:.0f} s")
    print("  RSS MB at image " + ", ".join(f"{k}: {v:.1f}" for k, v in sorted(samples.items())))
    print(
        f"  growth from image 500 to {args.memory_images}: {samples[args.memory_images] - samples[500]:+.1f} MB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--short-size", type=int, default=320)
    p.add_argument("--max-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-ray", dest="ray", action="store_false", help="leave out the Ray peer")
    p.add_argument("--memory", action="store_true", help="measure the RSS of a long job instead")
    p.add_argument("--memory-images", type=int, default=5000)
    args = p.parse_args()
    memory(args) if args.memory else throughput(args)


if __name__ == "__main__":
    main()
