"""Slicing through the front doors: ``predict --slice``, ``eval --slice``, the server's ``?slice=``,
and their errors (overlap outside [0, 1), a slice larger than the image, flags without --slice)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from atssdet.cli import main
from atssdet.convert import save_safetensors
from atssdet.detector import Detector
from tests.blob_runner import CFG, BlobRunner, blob_image


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo architecture with random weights, at a 64 px test size (a fast model file)."""
    from atssdet.config import with_overrides
    from atssdet.modeling.atss import build_model

    torch.manual_seed(0)
    cfg = with_overrides(CFG, {"test_image_short_size": 64, "test_image_max_size": 64})
    model = build_model(cfg)
    return save_safetensors(model.state_dict(), tmp_path_factory.mktemp("w") / "tiny.safetensors", cfg=cfg)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--slice", "64", "--slice-overlap", "1.0"], "slice overlap must be in [0, 1)"),
        (["--slice", "64", "--slice-overlap", "-0.5"], "slice overlap must be a finite number in [0, 1]"),
        (["--slice-overlap", "0.3"], "--slice-overlap needs --slice S"),
        (["--slice", "0"], "slice size"),
    ],
)
def test_bad_slice_flags_fail_before_loading(flags: list[str], message: str, capsys) -> None:
    assert main(["predict", "img.png", "--weights", "missing.safetensors", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atssdet predict: error: ") and message in err, err


def test_predict_slice_writes_results_and_names_a_too_small_image(
    tiny_weights: Path, tmp_path: Path, capsys
) -> None:
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / "big.png"), rng.integers(0, 255, (150, 200, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "small.png"), rng.integers(0, 255, (50, 60, 3), dtype=np.uint8))
    args = ["predict", "big.png", "small.png", "--weights", str(tiny_weights), "--no-progress", "--no-draw"]
    assert main([*args, "--slice", "64", "--slice-merge", "nmm", "--out", "o"]) == 0
    err = capsys.readouterr().err
    assert "small.png: slice size 64 is larger than the 60x50 image" in err
    records = json.loads((tmp_path / "o" / "predictions.json").read_text())
    text = json.dumps(records)
    assert "big.png" in text and "slice size 64 is larger" in text


def test_eval_slice_runs_on_small_objects(tiny_weights: Path, tmp_path: Path, capsys) -> None:
    from atssdet.data.synth_small import generate_small_objects

    data = generate_small_objects(tmp_path / "d", num_images=1, size=(160, 160), cell=80)
    assert data.num_boxes >= 1
    code = main(
        ["eval", "--weights", str(tiny_weights), "--data", str(data.ann_file), "--images", str(data.images),
         "--slice", "80", "--out", "r.json", "--no-progress", "--workers", "1"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text()) is not None  # COCO results of the sliced run


def test_server_slices_on_request_and_refuses_a_too_large_slice() -> None:
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    import httpx

    from atssdet.serve.app import create_app

    rects = [(5, 5, 17, 17), (40, 20, 54, 32), (140, 44, 152, 56)]
    app = create_app(Detector(BlobRunner(), short_size=64, max_size=64), max_batch=2, max_wait_ms=1)
    ok, png = cv2.imencode(".png", blob_image(160, 224, rects))
    assert ok

    async def post(query: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post(
                f"/v1/detect?score_threshold=0{query}", files={"file": ("a.png", png.tobytes())}
            )

    r = asyncio.run(post("&slice=64&slice_overlap=0.25"))
    assert r.status_code == 200, r.text
    assert sorted(tuple(round(v) for v in b) for b in r.json()["boxes"]) == sorted(rects)
    bad = asyncio.run(post("&slice=640"))
    assert bad.status_code == 422 and "slice size 640 is larger than the 224x160 image" in bad.text
    bad = asyncio.run(post("&slice=64&slice_overlap=1"))
    assert bad.status_code == 422 and "slice overlap" in bad.text
