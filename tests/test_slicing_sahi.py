"""The SAHI model adapter: SAHI's own sliced prediction with an atssdet Detector behind it."""

from __future__ import annotations

import pytest

from atssdet.detector import Detector
from tests.blob_runner import BlobRunner, blob_image

pytest.importorskip("sahi", reason="sahi is not installed (pip install --no-deps sahi; see the 'sahi' extra)")

RECTS = [(5, 5, 17, 17), (40, 20, 54, 32), (90, 100, 102, 110), (140, 44, 152, 56)]


def test_sahi_sliced_prediction_through_the_adapter() -> None:
    from sahi.predict import get_sliced_prediction

    from atssdet.integrations.sahi_model import AtssdetDetectionModel

    runner = BlobRunner()
    model = AtssdetDetectionModel(
        model=Detector(runner, short_size=64, max_size=64), confidence_threshold=0.1
    )
    image = blob_image(160, 224, RECTS)[..., ::-1].copy()  # SAHI works in RGB
    result = get_sliced_prediction(
        image,
        model,
        slice_height=64,
        slice_width=64,
        overlap_height_ratio=0.25,
        overlap_width_ratio=0.25,
        perform_standard_pred=False,
        postprocess_type="GREEDYNMM",
        postprocess_match_metric="IOS",
        postprocess_match_threshold=0.5,
        batch_size=4,
        verbose=0,
    )
    boxes = sorted(tuple(round(v) for v in p.bbox.to_xyxy()) for p in result.object_prediction_list)
    assert boxes == sorted(RECTS)
    assert max(runner.batches) == 4 and all(
        p.category.name == "circle" for p in result.object_prediction_list
    )
