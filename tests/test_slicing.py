"""Sliced inference: tile geometry, the merges (NMS, greedy NMM, boxes cut by tiles), batching, bad input.

A "blob runner" (tests/blob_runner.py) stands in for the network on hand-made images, so the
expected merged boxes are the drawn rectangles themselves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from atssdet.detector import Detector
from atssdet.errors import OptionError
from atssdet.options import InferenceOptions, SliceOptions
from atssdet.slicing import (
    cut_by_tile,
    drop_cut_duplicates,
    greedy_nmm,
    pairwise_ios,
    tile_starts,
    tile_windows,
)
from tests.blob_runner import CFG, BlobRunner, blob_image


def sliced(size=64, overlap=0.25, **kw) -> InferenceOptions:
    return InferenceOptions(score_threshold=0.0, slicing=SliceOptions(size=size, overlap=overlap, **kw))


def blob_detector() -> Detector:
    return Detector(BlobRunner(), short_size=64, max_size=64)  # tiles run at their own size


def test_tile_starts_end_at_the_border() -> None:
    assert tile_starts(100, 40, 0.25).tolist() == [0, 30, 60]  # step 30; 60 + 40 = 100
    assert tile_starts(101, 40, 0.25).tolist() == [0, 30, 60, 61]  # the last tile shifted back
    assert tile_starts(40, 40, 0.5).tolist() == [0]
    assert tile_starts(120, 40, 0.0).tolist() == [0, 40, 80]


def test_tile_windows_cover_the_image_inside_it() -> None:
    windows = tile_windows(150, 230, 64, 0.2)
    assert windows.shape == (len(tile_starts(150, 64, 0.2)) * len(tile_starts(230, 64, 0.2)), 4)
    assert bool(((windows[:, 2:] - windows[:, :2]) == 64).all())
    covered = np.zeros((150, 230), bool)
    for x1, y1, x2, y2 in windows.tolist():
        assert 0 <= x1 < x2 <= 230 and 0 <= y1 < y2 <= 150
        covered[y1:y2, x1:x2] = True
    assert covered.all()


def test_bad_slice_options_are_named() -> None:
    with pytest.raises(OptionError, match=r"slice size 640 is larger than the 500x400 image"):
        tile_windows(400, 500, 640, 0.2)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(OptionError, match="slice overlap"):
            SliceOptions(size=64, overlap=bad)
    with pytest.raises(OptionError, match="slice merge must be one of nms, nmm"):
        SliceOptions(size=64, merge="wbf")
    with pytest.raises(OptionError, match="slice size"):
        SliceOptions(size=0)
    with pytest.raises(OptionError, match="unknown field"):
        InferenceOptions(slicing={"size": 64, "tile": 3})
    assert InferenceOptions(slicing={"size": 64}).slicing == SliceOptions(size=64)


def test_slice_larger_than_an_image_is_that_images_error() -> None:
    det = blob_detector()
    small, big = blob_image(40, 50, []), blob_image(100, 100, [(10, 10, 20, 20)])
    a, b = det.predict([small, big], options=sliced())
    assert a.error is not None and "<array 0>: slice size 64 is larger than the 50x40 image" in a.error
    assert b.ok and b.boxes.tolist() == [[10.0, 10.0, 20.0, 20.0]]


def _greedy_nmm_reference(boxes, scores, labels, thr):
    """SAHI's greedy_nmm as a plain loop (the definition the tensor version must equal)."""
    order = scores.argsort(descending=True, stable=True).tolist()
    match = ((pairwise_ios(boxes, boxes) > thr) & (labels[:, None] == labels[None, :])).tolist()
    visited, out = set(), []
    for i in order:
        if i in visited:
            continue
        visited.add(i)
        group = [i] + [j for j in order if j not in visited and match[i][j]]
        visited.update(group)
        g = boxes[group]
        out.append((g[:, :2].min(0).values.tolist() + g[:, 2:].max(0).values.tolist(), float(scores[i])))
    return out


def test_greedy_nmm_hand_cases_and_equals_the_greedy_loop() -> None:
    boxes = torch.tensor(
        [[0, 0, 12, 10], [8, 0, 20, 10], [8, 0, 20, 10], [50, 50, 60, 60]], dtype=torch.float32
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    b, s, lab = greedy_nmm(boxes, scores, labels, 0.3)  # IoS of the two halves: 40 / 120 = 0.33
    assert b.tolist() == [[0, 0, 20, 10], [8, 0, 20, 10], [50, 50, 60, 60]]
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.6]) and lab.tolist() == [0, 1, 0]
    # A chain a~b, b~c, not a~c: b joins a, so c (visited later) leads its own group.
    chain = torch.tensor([[0, 0, 10, 10], [6, 0, 16, 10], [12, 0, 22, 10]], dtype=torch.float32)
    b, s, _ = greedy_nmm(chain, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), 0.3)
    assert b.tolist() == [[0, 0, 16, 10], [12, 0, 22, 10]]
    # extend: only the marked members grow the box; a loose whole box is just suppressed.
    loose = torch.tensor([[10, 10, 20, 20], [0, 0, 100, 100], [18, 10, 30, 20]], dtype=torch.float32)
    b, _, _ = greedy_nmm(loose, torch.tensor([0.9, 0.2, 0.5]), torch.zeros(3, dtype=torch.long), 0.1,
                         extend=torch.tensor([False, False, True]))  # fmt: skip
    assert b.tolist() == [[10, 10, 30, 20]]
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=gen) * 200
    rnd = torch.cat((xy, xy + 5 + torch.rand(200, 2, generator=gen) * 40), 1)
    rs, rl = torch.rand(200, generator=gen), torch.randint(0, 3, (200,), generator=gen)
    b, s, _ = greedy_nmm(rnd, rs, rl, 0.4)
    ref = _greedy_nmm_reference(rnd, rs, rl, 0.4)
    assert len(ref) < 160  # the case merges a lot
    assert [(bb, pytest.approx(ss)) for bb, ss in ref] == list(zip(b.tolist(), s.tolist(), strict=True))


def test_cut_boxes_are_dropped_only_when_a_whole_box_covers_them() -> None:
    windows = torch.tensor([[0, 0, 64, 64], [48, 0, 112, 64], [0, 0, 64, 64]])
    boxes = torch.tensor([[50, 10, 64, 20], [52, 10, 70, 20], [0, 30, 10, 40]], dtype=torch.float32)
    cut = cut_by_tile(boxes, windows, (64, 112))
    assert cut.tolist() == [True, False, False]  # x2 at the inner edge 64; x1 = 0 is the image border
    keep = drop_cut_duplicates(boxes, torch.zeros(3, dtype=torch.long), cut, 0.5)
    assert keep.tolist() == [False, True, True]
    other_class = drop_cut_duplicates(boxes, torch.tensor([1, 0, 0]), cut, 0.5)
    assert other_class.tolist() == [True, True, True]


RECTS = [(5, 5, 17, 17), (40, 20, 54, 32), (90, 100, 102, 110), (140, 44, 152, 56), (60, 120, 72, 130)]


@pytest.mark.parametrize("merge", ["nms", "nmm"])
def test_sliced_detector_finds_each_object_once_in_few_forwards(merge: str) -> None:
    det = blob_detector()
    image = blob_image(160, 224, RECTS)  # several rects straddle the tile edges at 48, 64, 96, 112...
    (result,) = det.predict([image], batch_size=4, options=sliced(merge=merge))
    runner = det.runner
    assert isinstance(runner, BlobRunner)
    tiles = len(tile_windows(160, 224, 64, 0.25))
    assert runner.batches == [4] * (tiles // 4) + ([tiles % 4] if tiles % 4 else [])  # batched, in order
    got = sorted(tuple(b) for b in result.boxes.tolist())
    assert got == sorted(tuple(float(v) for v in r) for r in RECTS)
    assert result.image_hw == (160, 224) and result.labels.tolist() == [0] * len(RECTS)


def test_nmm_joins_an_object_larger_than_the_overlap() -> None:
    det = blob_detector()
    image = blob_image(64, 112, [(20, 20, 100, 30)])  # 80 px wide, two tiles of 64 overlapping by 16
    (nmm,) = det.predict([image], options=sliced(merge="nmm", merge_threshold=0.3))
    assert nmm.boxes.tolist() == [[20.0, 20.0, 100.0, 30.0]]
    (nms,) = det.predict([image], options=sliced(merge="nms"))
    assert len(nms) == 2  # NMS keeps both cut halves (neither covers the other)


def test_full_image_pass_and_tile_batch_option() -> None:
    det = blob_detector()
    image = blob_image(128, 128, [(30, 30, 100, 100)])  # 70 px object: no tile holds it whole
    opts = sliced(full_image=True, batch_size=16)
    (result,) = det.predict([image], options=opts)
    runner = det.runner
    assert isinstance(runner, BlobRunner)
    assert runner.batches == [9, 1]  # 3x3 tiles in one forward, then the whole image
    # the full-image box (uncut) is kept, the tiles' cut parts inside it are dropped
    torch.testing.assert_close(result.boxes, torch.tensor([[30.0, 30.0, 100.0, 100.0]]), atol=1.0, rtol=0)


def test_a_real_model_sees_one_forward_per_tile_batch() -> None:
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    model = build_model(CFG)
    calls: list[int] = []
    model.register_forward_hook(lambda m, args, out: calls.append(int(args[0].shape[0])))
    det = Detector(model, device="cpu", short_size=64, max_size=64)
    image = np.random.default_rng(0).integers(0, 255, (100, 180, 3), dtype=np.uint8)
    opts = dataclasses.replace(sliced(), max_detections=5)
    (result,) = det.predict([image], batch_size=3, options=opts)
    tiles = len(tile_windows(100, 180, 64, 0.25))
    assert calls == [3] * (tiles // 3) + ([tiles % 3] if tiles % 3 else [])
    assert result.ok and len(result) <= 5
    assert bool((result.boxes[:, 2] <= 180 + 1e-3).all() and (result.boxes[:, 3] <= 100 + 1e-3).all())


def test_slicing_raises_map_where_whole_images_lose_small_objects(tmp_path) -> None:
    """A detector that misses anything under 6 px: resized whole (256 -> 64 px) 10 px squares
    become 2.5 px and vanish; 64 px tiles keep them at 10 px. mAP through the evaluation path."""
    import json

    import cv2

    from atssdet.evaluation import evaluate

    rng = np.random.default_rng(0)
    images, anns = [], []
    (tmp_path / "img").mkdir()
    for i in range(2):
        cells = rng.choice(64, size=12, replace=False)
        rects = [
            (int(c % 8) * 32 + 8, int(c // 8) * 32 + 8, int(c % 8) * 32 + 18, int(c // 8) * 32 + 18)
            for c in cells
        ]
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), blob_image(256, 256, rects))
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 256, "width": 256})
        anns += [
            {
                "id": len(anns) + k + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [x1, y1, 10, 10],
                "area": 100,
                "iscrowd": 0,
            }
            for k, (x1, y1, _, _) in enumerate(rects)
        ]
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(CFG.class_names)]
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    det = Detector(BlobRunner(min_side=6), short_size=64, max_size=64)
    base = InferenceOptions(score_threshold=0.0)
    whole = evaluate(det, ann_file, tmp_path / "img", options=base, progress=False, num_workers=1)
    tiles = evaluate(det, ann_file, tmp_path / "img", options=sliced(), progress=False, num_workers=1)
    assert whole.stats["AP"] < 0.05 and tiles.stats["AP"] > 0.9, (whole.stats["AP"], tiles.stats["AP"])


@pytest.mark.parametrize("keep_images", [False, True])
def test_sliced_file_inputs_with_or_without_keeping_images(tmp_path, keep_images: bool) -> None:
    """File inputs are sliced whether or not the caller keeps the images (predict --no-draw, eval)."""
    import cv2

    path = tmp_path / "rects.png"
    cv2.imwrite(str(path), blob_image(160, 224, RECTS))
    (result,) = blob_detector().iter_predict([path], options=sliced(), keep_images=keep_images)
    assert result.error is None
    assert sorted(tuple(b) for b in result.boxes.tolist()) == sorted(
        tuple(float(v) for v in r) for r in RECTS
    )
    assert (result.image is not None) == keep_images
