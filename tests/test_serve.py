"""HTTP serving (atssdet.serve): API results equal DetEvaluator.predict, error codes, batching, recovery.

The app runs in-process (httpx ASGI transport) with the res18 reference checkpoint at a small test
size (320/512) to keep forward passes cheap.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the 'serve' extra (python-multipart) is not installed")
httpx = pytest.importorskip("httpx", reason="the 'serve' extra (httpx) is not installed")

from atssdet.cli import main  # noqa: E402
from atssdet.compat import CompatModel, DetEvaluator  # noqa: E402
from atssdet.config import COCO_CLASSES, with_overrides  # noqa: E402
from atssdet.detector import Detector  # noqa: E402
from atssdet.loader import load  # noqa: E402
from atssdet.options import InferenceOptions  # noqa: E402
from atssdet.postprocess import select_detections  # noqa: E402
from atssdet.serve import ApiError, DynamicBatcher, create_app, decode_upload, request_options  # noqa: E402
from atssdet.structures import Detections  # noqa: E402
from tests.conftest import R18  # noqa: E402
from tests.helpers import assert_dets_match  # noqa: E402

SMALL = {"test_image_short_size": 320, "test_image_max_size": 512}
NAMES = ("cat.jpg", "synth_600x900.png")


def _run(coro_fn: Any) -> Any:
    return asyncio.run(coro_fn())


def _request(app: Any, method: str, url: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.request(method, url, **kwargs)

    return cast(httpx.Response, _run(go))


def _detect(app: Any, image_bytes: bytes, name: str = "image.jpg", **kwargs: Any) -> httpx.Response:
    return _request(app, "POST", "/v1/detect", files={"file": (name, image_bytes)}, **kwargs)


def _as_array(body: dict[str, Any]) -> np.ndarray:
    """Response -> ``[K, 6]`` (x1, y1, x2, y2, score, class) like ``DetEvaluator.predict``."""
    boxes = np.asarray(body["boxes"], dtype=np.float64).reshape(-1, 4)
    return np.column_stack((boxes, body["scores"], body["labels"]))


@pytest.fixture(scope="module")
def small_cfg(r18_model):
    return with_overrides(r18_model.cfg, SMALL)


@pytest.fixture(scope="module")
def small_detector(r18_checkpoint):
    """The reference res18 served at the small test sizes (its config carries them, as `serve --set`)."""
    return Detector(load(R18, weights=r18_checkpoint, overrides=SMALL))


@pytest.fixture(scope="module")
def app(small_detector):
    app = create_app(small_detector, model_name=R18, max_batch=8, max_wait_ms=20)
    yield app
    app.state.batcher.stop()


@pytest.fixture(scope="module")
def uploads(reference_dir: Path) -> dict[str, bytes]:
    return {name: (reference_dir / name).read_bytes() for name in NAMES}


@pytest.fixture(scope="module")
def expected(r18_model, uploads) -> dict[str, np.ndarray]:
    """``DetEvaluator.predict`` (the seed API, batch 1) at the same test size."""
    out = {}
    for name, data in uploads.items():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        inputs, im_info = DetEvaluator.process_inputs(image, SMALL["test_image_short_size"], 512)
        out[name] = DetEvaluator(r18_model).predict(inputs, im_info)
    return out


def test_detect_equals_det_evaluator_predict(app, uploads, expected):
    """Concurrent requests (batched or not, mixed sizes) each get exactly the seed API's detections."""

    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            order = ["cat.jpg", "synth_600x900.png", "cat.jpg"]
            return list(
                await asyncio.gather(*(c.post("/v1/detect", files={"file": (n, uploads[n])}) for n in order))
            )

    responses = _run(go)
    for name, resp in zip(["cat.jpg", "synth_600x900.png", "cat.jpg"], responses, strict=True):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        ref = expected[name]
        assert len(ref) > 0
        assert_dets_match(_as_array(body), ref)
        assert body["names"] == [COCO_CLASSES[i] for i in body["labels"]]
        h, w = cv2.imdecode(np.frombuffer(uploads[name], np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert body["image"] == {"width": w, "height": h}
        assert body["model"] == R18
        assert body["score_threshold"] == pytest.approx(0.05)
        assert set(body["timing_ms"]) == {"decode", "queue", "inference", "total"}
        assert 1 <= body["batch_size"] <= 3


def test_detect_batch_mixed_sizes_equals_predict(app, small_cfg, uploads, expected):
    """One call of the app's batch function over images of two padded sizes: each image as if alone."""
    images = [cv2.imdecode(np.frombuffer(uploads[n], np.uint8), cv2.IMREAD_COLOR) for n in NAMES]
    dets = app.state.batcher.detect(
        [images[0], images[1], images[0]], InferenceOptions.from_config(small_cfg)
    )
    for d, name in zip(dets, [NAMES[0], NAMES[1], NAMES[0]], strict=True):
        assert_dets_match(d.to_array().numpy(), expected[name])


def test_options_form_and_query(app, r18_model, small_cfg, uploads):
    """score_threshold / classes (names and ids) / class_agnostic equal select_detections with them."""
    image = cv2.imdecode(np.frombuffer(uploads["cat.jpg"], np.uint8), cv2.IMREAD_COLOR)
    inputs, im_info = DetEvaluator.process_inputs(image, 320, 512)
    with torch.no_grad():
        ((scores, boxes),) = CompatModel(r18_model).dense(inputs, im_info)

    def ref(**options: Any) -> np.ndarray:
        (d,) = select_detections(
            scores[None], boxes[None], nms_threshold=small_cfg.test_nms, max_detections=100, **options
        )
        return d.to_array().numpy()

    resp = _detect(app, uploads["cat.jpg"], data={"score_threshold": "0.3", "classes": "Person, 15,bicycle"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["classes"] == [0, 1, 15]
    want = ref(score_threshold=0.3, classes=torch.tensor([0, 1, 15]))
    assert len(want) > 0
    assert_dets_match(_as_array(body), want)

    resp = _detect(app, uploads["cat.jpg"], params={"class_agnostic": "true", "score_threshold": "0.25"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["class_agnostic"] is True
    assert_dets_match(_as_array(body), ref(score_threshold=0.25, class_agnostic=True))


def test_bad_uploads_get_documented_codes_and_server_keeps_serving(app, small_detector, uploads, expected):
    cases = [
        # (files, form data, status, words the JSON error must contain)
        ({"file": ("notes.txt", b"hello, not an image")}, {}, 415, ["notes.txt", "not a supported image"]),
        (
            {"file": ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)},
            {},
            422,
            ["broken.png", "truncated PNG"],
        ),
        ({"file": ("empty.jpg", b"")}, {}, 422, ["empty.jpg", "empty"]),
        (None, {"score_threshold": "0.3"}, 422, ["file", "required"]),
        ({"file": ("a.jpg", uploads["cat.jpg"])}, {"score_threshold": "1.5"}, 422, ["score_threshold"]),
        ({"file": ("a.jpg", uploads["cat.jpg"])}, {"score_threshold": "abc"}, 422, ["score_threshold"]),
        ({"file": ("a.jpg", uploads["cat.jpg"])}, {"classes": "person,dgo"}, 422, ["'dgo'"]),
        ({"file": ("a.jpg", uploads["cat.jpg"])}, {"classes": "80"}, 422, ["80", "out of range"]),
        ({"file": ("a.jpg", uploads["cat.jpg"])}, {"classes": "\u00b2"}, 422, ["classes", "'\u00b2'"]),
    ]
    for files, data, status, words in cases:
        resp = _request(app, "POST", "/v1/detect", files=files, data=data)
        assert resp.status_code == status, (files, data, resp.text)
        error = resp.json()["error"]
        for word in words:
            assert word in error, (word, error)

    # Size limit: declared (Content-Length) and streamed (chunked, no length) bodies over the limit.
    small = create_app(small_detector, model_name=R18, max_upload_mb=0.05)
    assert len(uploads["cat.jpg"]) > 0.05 * 2**20
    resp = _detect(small, uploads["cat.jpg"])
    assert resp.status_code == 413 and "0.05 MB upload limit" in resp.json()["error"]

    boundary = "xyzBOUNDARYxyz"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    async def chunks():  # type: ignore[no-untyped-def]
        yield head
        for _ in range(8):
            yield b"\xff" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = _request(
        small,
        "POST",
        "/v1/detect",
        content=chunks(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status_code == 413, resp.text
    assert "upload limit" in resp.json()["error"]

    resp = _request(app, "GET", "/no/such/page")
    assert resp.status_code == 404 and resp.json() == {"error": "Not Found"}

    # The same server still answers correctly.
    resp = _detect(app, uploads["cat.jpg"], "cat.jpg")
    assert resp.status_code == 200
    assert_dets_match(_as_array(resp.json()), expected["cat.jpg"])


def test_failing_inference_returns_500_and_server_recovers(app, uploads, expected, monkeypatch):
    real = app.state.batcher.detect

    def broken(*args: Any, **kwargs: Any) -> list[Detections]:
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(app.state.batcher, "detect", broken)
    resp = _detect(app, uploads["cat.jpg"])
    assert resp.status_code == 500
    # Issue 14 item 8: the body names the upload and the failure, never the exception's type or text
    # (which can carry server paths); the request id finds the traceback in the server log.
    body = resp.json()
    assert body["error"].startswith("inference failed for image.jpg (459x612 pixels)")
    assert body["request_id"] in body["error"] and resp.headers["x-request-id"] == body["request_id"]
    assert "RuntimeError" not in body["error"] and "simulated" not in body["error"]
    assert _request(app, "GET", "/healthz").json()["status"] == "ok"

    monkeypatch.setattr(app.state.batcher, "detect", real)
    resp = _detect(app, uploads["cat.jpg"])
    assert resp.status_code == 200
    assert_dets_match(_as_array(resp.json()), expected["cat.jpg"])


def test_batcher_takes_queued_requests_together_in_order():
    """While the worker is busy, requests queue; the next batch takes up to max_batch of them,
    split by options, and every request gets its own result."""
    calls: list[tuple[int, InferenceOptions]] = []
    entered, release = threading.Event(), threading.Event()

    def fake(images: list[np.ndarray], options: InferenceOptions) -> list[Detections]:
        calls.append((len(images), options))
        if len(calls) == 1:
            entered.set()
            assert release.wait(10)
        # Each result carries its image's marker value as the score.
        return [
            Detections(
                torch.zeros(1, 4), torch.tensor([float(im[0, 0, 0])]), torch.zeros(1, dtype=torch.long)
            )
            for im in images
        ]

    batcher = DynamicBatcher(fake, max_batch=8, max_wait_ms=0)
    default, other = (
        InferenceOptions(score_threshold=0.05),
        InferenceOptions(score_threshold=0.5, class_agnostic=True),
    )
    try:
        futures = [batcher.submit(np.full((2, 2, 3), 0, np.uint8), default)]
        assert entered.wait(10)
        for i in range(1, 10):
            futures.append(batcher.submit(np.full((2, 2, 3), i, np.uint8), default))
        futures.append(batcher.submit(np.full((2, 2, 3), 10, np.uint8), other))
        release.set()
        results = [f.result(timeout=10) for f in futures]
    finally:
        batcher.stop()
    assert [(n, o) for n, o in calls] == [(1, default), (8, default), (1, default), (1, other)]
    assert [float(r.detections.scores[0]) for r in results] == [float(i) for i in range(11)]
    assert [r.batch_size for r in results] == [1] + [8] * 8 + [1, 1]
    assert batcher.batches == 4 and batcher.requests == 11 and not batcher.alive


def test_health_models_openapi_and_page(app):
    health = _request(app, "GET", "/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    (info,) = _request(app, "GET", "/v1/models").json()["models"]
    assert info["name"] == R18
    assert info["classes"] == list(COCO_CLASSES)
    assert info["config"]["test_image_short_size"] == 320 and info["config"]["test_image_max_size"] == 512
    assert info["serving"] == {"max_batch": 8, "max_wait_ms": 20, "max_upload_mb": 20.0}
    schema = _request(app, "GET", "/openapi.json").json()
    post = schema["paths"]["/v1/detect"]["post"]
    body_ref = post["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].split("/")[-1]
    assert "file" in schema["components"]["schemas"][body_ref]["required"]
    assert {"200", "413", "415", "422", "500"} <= set(post["responses"])
    assert {"/healthz", "/v1/models"} <= set(schema["paths"])
    page = _request(app, "GET", "/")
    assert page.headers["content-type"].startswith("text/html")
    for marker in ('id="file"', 'id="threshold"', 'id="canvas"', 'id="download"', "/v1/detect"):
        assert marker in page.text


def test_decode_upload_and_parse_classes():
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    ok, png = cv2.imencode(".png", image)
    assert ok
    np.testing.assert_array_equal(decode_upload(png.tobytes(), filename="x.png"), image)
    for data, status in [(b"", 422), (png.tobytes()[:20], 422), (b"GIF89a\x00\x00", 422), (b"%PDF-1.7", 415)]:
        with pytest.raises(ApiError) as err:
            decode_upload(data, filename="up")
        assert err.value.status == status, data

    names = ("person", "traffic light", "cat")
    defaults = InferenceOptions()
    assert request_options(defaults, names, classes=None).classes is None
    assert request_options(defaults, names, classes=" , ").classes is None
    assert request_options(defaults, names, classes="cat, Traffic Light,0,2").classes == (0, 1, 2)
    for bad in ("dog", "3", "-1", "\u00b2"):  # "²" is a digit to str.isdigit, yet no label id
        with pytest.raises(ApiError, match="classes") as err:
            request_options(defaults, names, classes=bad)
        assert err.value.status == 422
    for value in (1.5, -0.1, float("nan")):
        with pytest.raises(ApiError, match="score_threshold") as err:
            request_options(defaults, names, score_threshold=value)
        assert err.value.status == 422
    opts = request_options(defaults, names, score_threshold=0.3, class_agnostic=True)
    assert opts == defaults.replace(score_threshold=0.3, class_agnostic=True)


def test_cli_serve_rejects_bad_arguments(r18_checkpoint, capsys):
    assert main(["serve", "--weights", str(r18_checkpoint)]) == 2
    err = capsys.readouterr().err
    assert str(r18_checkpoint) in err and "--model" in err
    assert (
        main(["serve", "--model", R18, "--weights", str(r18_checkpoint), "--set", "backbone=resnet50"]) == 2
    )
    assert "test_*" in capsys.readouterr().err
    assert main(["serve", "--model", R18, "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err


def test_run_server_refuses_an_unguarded_or_tokenless_public_app(small_detector):
    """run_server needs an access policy (Host/Origin/token checks) and a token off loopback."""
    from atssdet.serve import AccessPolicy, run_server

    bare = create_app(small_detector, model_name=R18)
    with pytest.raises(ValueError, match="access=AccessPolicy"):
        run_server(bare, host="127.0.0.1", port=0)
    # A loopback policy reused for a public address is refused before any socket is bound.
    loop = create_app(small_detector, model_name=R18, access=AccessPolicy.for_address("127.0.0.1"))
    with pytest.raises(ValueError, match="--host 0.0.0.0: serving a non-loopback address needs a token"):
        run_server(loop, host="0.0.0.0", port=0)
