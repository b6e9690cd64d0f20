"""Tracking quality on generated videos with ground truth: MOTA, IDF1, HOTA (TrackEval-parity metrics).

    python benchmarks/bench_tracking.py --weights runs/demo/model.safetensors
    python benchmarks/bench_tracking.py --weights M --videos 3 --frames 90 --objects 6

Videos come from :mod:`atssdet.data.synth_video` (moving, occluding shapes; MOT ground truth).
Each video goes through :func:`atssdet.video.predict_video` with ``track=`` (the path of
``atssdet predict VIDEO --track NAME``); its JSON lines are written out as MOT results and scored
by ``trackers.eval.evaluate_mot_sequence`` (CLEAR, HOTA, Identity; the package states TrackEval
parity). The "oracle" rows feed the ground-truth boxes of each frame (score 0.9) to the tracker:
what the tracker alone loses. The model runs class-agnostic NMS (tracks are class-agnostic).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from atssdet.detector import Detector  # noqa: E402
from atssdet.structures import Detections  # noqa: E402
from atssdet.tracking import TRACKERS, Tracker  # noqa: E402
from atssdet.video import predict_video  # noqa: E402


def write_mot(rows: list[tuple[int, int, list[float], float]], path: Path) -> Path:
    lines = [
        f"{f},{i},{b[0]:.2f},{b[1]:.2f},{b[2] - b[0]:.2f},{b[3] - b[1]:.2f},{s:.4f},-1,-1,-1"
        for f, i, b, s in rows
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def from_jsonl(jsonl: Path) -> list[tuple[int, int, list[float], float]]:
    rows = []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        for d in rec["detections"]:
            if d["track_id"] >= 0:
                rows.append((rec["frame"] + 1, d["track_id"] + 1, d["box"], d["score"]))
    return rows


def oracle(gt_file: Path, name: str, num_frames: int) -> list[tuple[int, int, list[float], float]]:
    gt = np.loadtxt(gt_file, delimiter=",", ndmin=2)
    tracker, rows = Tracker(name), []
    for f in range(1, num_frames + 1):
        g = gt[gt[:, 0] == f]
        boxes = torch.tensor(np.column_stack((g[:, 2:4], g[:, 2:4] + g[:, 4:6])), dtype=torch.float32)
        det = Detections(
            boxes.reshape(-1, 4), torch.full((len(g),), 0.9), torch.zeros(len(g), dtype=torch.long)
        )
        ids = tracker.update(det, np.zeros((240, 320, 3), np.uint8))
        rows += [(f, int(i) + 1, b, 0.9) for b, i in zip(boxes.tolist(), ids.tolist(), strict=True) if i >= 0]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--weights", required=True, help="model file (e.g. the demo's model.safetensors)")
    parser.add_argument("--videos", type=int, default=3)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--objects", type=int, default=6)
    parser.add_argument("--score-threshold", type=float, default=0.1)
    args = parser.parse_args()
    from trackers.eval import evaluate_mot_sequence

    from atssdet.data.synth_video import generate_video

    det = Detector.from_checkpoint(args.weights, device="cpu")
    opts = det.options.replace(class_agnostic=True, nms_threshold=0.5, score_threshold=args.score_threshold)
    print(
        f"# {args.videos} videos x {args.frames} frames (320x240), {args.objects} moving shapes each; model {args.weights}"
    )
    print("| tracker | detections | MOTA | IDF1 | HOTA | ID switches |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = [
            generate_video(
                root / "data", name=f"seq{k}", seed=k, num_frames=args.frames, num_objects=args.objects
            )
            for k in range(args.videos)
        ]
        for name in TRACKERS:
            for source in ("model", "oracle"):
                results = []
                for k, v in enumerate(videos):
                    if source == "model":
                        out = root / f"out_{name}"
                        report = predict_video(
                            v.video,
                            detector=det,
                            out_dir=out,
                            options=opts,
                            track=name,
                            draw=False,
                            progress=False,
                        )
                        rows = from_jsonl(report.jsonl_path)
                    else:
                        rows = oracle(v.gt_file, name, v.num_frames)
                    mot = write_mot(rows, root / f"{name}_{source}_{k}.txt")
                    results.append(
                        evaluate_mot_sequence(v.gt_file, mot, metrics=["CLEAR", "HOTA", "Identity"])
                    )
                mota = np.mean([r.CLEAR.MOTA for r in results])
                idf1 = np.mean([r.Identity.IDF1 for r in results])
                hota = np.mean([r.HOTA.HOTA for r in results])
                idsw = sum(int(r.CLEAR.IDSW) for r in results)
                print(f"| {name} | {source} | {mota:.3f} | {idf1:.3f} | {hota:.3f} | {idsw} |")


if __name__ == "__main__":
    main()
