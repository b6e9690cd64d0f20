"""Issue 14: small inputs that would take a lot of memory, a server reachable by more than its user,
and one bad image in a server batch. A case table (``CASES``, counted per kind in docs/reliability.md).

Every case asserts the exit code or HTTP status, that the message names the input and the problem,
and that every file present before the command is byte-identical after it (and none was added).
The two memory acceptance cases (a 3 MB gzip bomb unpacking to 3 GiB, a 32-byte object-array
pickle) run the CLI in a subprocess and assert its peak RSS (``os.wait4``'s ``ru_maxrss``) under
1 GB; ``test_server_under_16_huge_uploads`` runs the real server in a subprocess.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import http.server
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the 'serve' extra (fastapi) is not installed")
pytest.importorskip("multipart", reason="the 'serve' extra (python-multipart) is not installed")
httpx = pytest.importorskip("httpx", reason="the 'serve' extra (httpx) is not installed")

from atssdet.cli import main  # noqa: E402
from atssdet.config import ATSSConfig  # noqa: E402
from atssdet.detector import Detector  # noqa: E402
from atssdet.loader import load  # noqa: E402
from atssdet.serve import AccessPolicy, create_app  # noqa: E402
from atssdet.structures import Detections  # noqa: E402
from atssdet.zoo import ZOO  # noqa: E402
from tests.conftest import R18, REPO_ROOT  # noqa: E402
from tests.helpers import assert_dets_match, snapshot_files  # noqa: E402

SMALL = {"test_image_short_size": 320, "test_image_max_size": 512}
GB = 10**9
BASE = "http://127.0.0.1:8000"  # the address the in-process apps pretend to be bound to
TOKEN = "s3cret-token-for-tests"


# --------------------------------------------------------------------------------------------------
# Inputs, generated (never stored)
# --------------------------------------------------------------------------------------------------


def write_gzip_bomb(path: Path, total: int) -> None:
    """A ``.pkl.gz`` that unpacks to ``total`` bytes: a valid pickle of an OrderedDict of 64 MiB byte
    strings of zeros. Written as gzip members of 1 MiB of zeros each (~1 KB compressed), so building
    it costs one compression, and the file is ~1/1000 of ``total``."""
    zeros = gzip.compress(bytes(1 << 20), compresslevel=9)
    per_entry = 64 << 20
    head = b"\x80\x04\x8c\x0bcollections\x8c\x0bOrderedDict\x93)R("  # OrderedDict() then MARK
    with open(path, "wb") as f:
        f.write(gzip.compress(head))
        for i in range(total // per_entry):
            key = f"w{i}".encode()
            f.write(
                gzip.compress(b"\x8c" + bytes([len(key)]) + key + b"\x8e" + per_entry.to_bytes(8, "little"))
            )
            for _ in range(per_entry >> 20):
                f.write(zeros)
        f.write(gzip.compress(b"u."))  # SETITEMS, STOP


# numpy.ndarray((400_000_000,), "O"): 3.2 GB of None pointers from 32 bytes.
OBJECT_ARRAY_PICKLE = b"\x80\x04cnumpy\nndarray\nJ\x00\x84\xd7\x17\x85X\x01\x00\x00\x00O\x86R."


class _Crafted:
    """Pickles as numpy does (``_reconstruct`` then BUILD with ``state``), with any state."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


def crafted_pickle(state: tuple[Any, ...]) -> bytes:
    return pickle.dumps(collections.OrderedDict(w=_Crafted(state)), protocol=4)


def reconstruct_pickle(shape: tuple[int, ...]) -> bytes:
    """``_reconstruct(ndarray, shape, b"b")`` with a big shape: numpy would allocate it at once."""
    from numpy._core.multiarray import _reconstruct

    class Big:
        def __reduce__(self) -> tuple[Any, ...]:
            return (_reconstruct, (np.ndarray, shape, b"b"))

    return pickle.dumps(collections.OrderedDict(w=Big()), protocol=4)


def write_config_safetensors(path: Path, **changes: Any) -> None:
    """A safetensors file whose atssdet_config metadata has ``changes`` (unchecked: written raw)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads(ATSSConfig().to_json())
    config.update(changes)
    save_file(
        {"w": torch.zeros(1)}, str(path), metadata={"format": "atssdet", "atssdet_config": json.dumps(config)}
    )


def png_bytes(width: int, height: int, *, level: int = 9) -> bytes:
    """An all-black RGB PNG, compressed row by row (never the whole image in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(level)
    row = bytes(1 + 3 * width)  # filter byte 0, then RGB
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` and holds no pixels (a decompression-bomb header)."""
    full = png_bytes(1, 1)
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    crc = zlib.crc32(b"IHDR" + ihdr).to_bytes(4, "big")
    return full[:16] + ihdr + crc + full[33:]


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


# --------------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    status: int  # exit code or HTTP status
    message: str  # stderr or the JSON error
    peak_rss: int | None = None  # bytes, for subprocess runs
    headers: dict[str, str] = field(default_factory=dict)


_LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


class Ctx:
    """What a case may use: ``work`` (its folder, snapshot before and after), the CLI, apps."""

    def __init__(self, work: Path, fixtures: dict[str, Any], capsys: Any, monkeypatch: Any) -> None:
        self.work = work
        self.fx = fixtures
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.apps: list[Any] = []
        self.cleanups: list[Callable[[], None]] = []

    def cli(self, *args: str) -> Outcome:
        self.capsys.readouterr()
        code = main(list(args))
        return Outcome(code, self.capsys.readouterr().err)

    def cli_measured(self, *args: str, timeout: float = 300) -> Outcome:
        """``python -m atssdet ARGS`` in a subprocess, with its peak RSS (``ru_maxrss``).

        A forked child's ``ru_maxrss`` starts at its parent's RSS (Linux keeps the high-water mark
        across exec), so a small launcher process runs the command and reports
        ``getrusage(RUSAGE_CHILDREN)`` for it alone.
        """
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        command = [sys.executable, "-m", "atssdet", *args]
        proc = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        message, _, peak = proc.stderr.rpartition("peak_rss_kb=")
        return Outcome(proc.returncode, message, peak_rss=int(peak) * 1024)

    def app(self, **kwargs: Any) -> Any:
        kwargs.setdefault("model_name", R18)
        app = create_app(self.fx["small_detector"], **kwargs)
        self.apps.append(app)
        return app

    def close(self) -> None:
        for app in self.apps:
            app.state.batcher.stop()
        for cleanup in self.cleanups:
            cleanup()

    def weights_server(self, body: bytes, *, declare_length: bool) -> str:
        """A 127.0.0.1 HTTP server answering every GET with ``body``; its base URL."""

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                self.send_response(200)
                if declare_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)  # without a length: HTTP/1.0, the body ends when the connection does

            def log_message(self, *args: object) -> None:
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        self.cleanups += [httpd.shutdown, httpd.server_close]
        return f"http://127.0.0.1:{httpd.server_address[1]}/"


def client(app: Any, *, raise_app_exceptions: bool = True) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    return httpx.AsyncClient(transport=transport, base_url=BASE, timeout=60)


def answer(resp: httpx.Response) -> Outcome:
    is_json = resp.headers.get("content-type", "").startswith("application/json")
    message = resp.json().get("error", "") if is_json else resp.text
    return Outcome(resp.status_code, message, headers=dict(resp.headers))


def http_call(
    app: Any, method: str, url: str, *, raise_app_exceptions: bool = True, **kwargs: Any
) -> Outcome:
    async def go() -> httpx.Response:
        async with client(app, raise_app_exceptions=raise_app_exceptions) as c:
            return await c.request(method, url, **kwargs)

    return answer(asyncio.run(go()))


def upload(name: str, data: bytes) -> dict[str, Any]:
    return {"files": {"file": (name, data)}}


def blocked_worker(app: Any) -> tuple[threading.Event, threading.Event]:
    """Make the app's batch function wait for ``release`` (``entered`` set once it is waiting)."""
    entered, release = threading.Event(), threading.Event()
    real = app.state.batcher.detect

    def waiting(images: list[np.ndarray], options: Any) -> list[Detections]:
        entered.set()
        assert release.wait(60)
        return cast(list[Detections], real(images, options))

    app.state.batcher.detect = waiting
    return entered, release


async def until(event: threading.Event, seconds: float = 30) -> None:
    for _ in range(int(seconds / 0.01)):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never started")


def while_busy(app: Any, first: tuple[str, bytes], second: tuple[str, bytes]) -> Outcome:
    """``second``'s answer while ``first`` holds the (blocked) worker; ``first`` must then succeed."""
    entered, release = blocked_worker(app)

    async def go() -> httpx.Response:
        async with client(app) as c:
            held = asyncio.create_task(c.post("/v1/detect", **upload(*first)))
            await until(entered)
            try:
                refused = await c.post("/v1/detect", **upload(*second))
            finally:
                release.set()
            assert (await held).status_code == 200
            return refused

    return answer(asyncio.run(go()))


# --------------------------------------------------------------------------------------------------
# The cases: prepare(ctx) writes the inputs into ctx.work and returns the command to run
# --------------------------------------------------------------------------------------------------

Prepare = Callable[[Ctx], Callable[[], Outcome]]


def _convert(ctx: Ctx, src: Path, *, measured: bool = False) -> Callable[[], Outcome]:
    args = ("convert", str(src), str(ctx.work / "out.safetensors"), "--model", R18)
    return (lambda: ctx.cli_measured(*args)) if measured else (lambda: ctx.cli(*args))


def m_gzip_bomb(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "bomb.pkl.gz"
    write_gzip_bomb(path, 3 * 2**30)
    assert path.stat().st_size < 4 * 2**20  # 3 MB on disk, 3 GiB unpacked
    return _convert(ctx, path, measured=True)


def m_object_array(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "objects.pkl"
    path.write_bytes(OBJECT_ARRAY_PICKLE)
    return _convert(ctx, path, measured=True)


def m_reconstruct_shape(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "shape.pkl"
    path.write_bytes(reconstruct_pickle((10**10,)))
    return _convert(ctx, path)


def m_state_without_data(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "hollow.pkl"
    path.write_bytes(crafted_pickle((1, (10**9,), np.dtype("f4"), False, bytes(16))))
    return _convert(ctx, path)


def m_object_dtype_state(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "objstate.pkl"
    path.write_bytes(crafted_pickle((1, (3,), np.dtype(object), False, [1, 2, 3])))
    return _convert(ctx, path)


def m_plain_pickle_over_cap(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "big.pkl"
    path.write_bytes(pickle.dumps(collections.OrderedDict(w=np.zeros(500_000, np.float32)), protocol=4))
    ctx.monkeypatch.setenv("ATSSDET_MAX_CHECKPOINT_BYTES", "1000000")
    return _convert(ctx, path)


def m_real_gzip_over_cap(ctx: Ctx) -> Callable[[], Outcome]:
    # The reference checkpoint (21 MB, 77 MB unpacked) under a 50 MB cap: the cap is configurable.
    ctx.monkeypatch.setenv("ATSSDET_MAX_CHECKPOINT_BYTES", "50000000")
    return _convert(ctx, ctx.fx["r18_checkpoint"])


def _predict(ctx: Ctx, weights: Path) -> Callable[[], Outcome]:
    image = ctx.work / "small.png"
    image.write_bytes(encode(np.zeros((240, 320, 3), np.uint8)))
    return lambda: ctx.cli("predict", str(image), "--weights", str(weights), "--out", str(ctx.work / "out"))


def m_metadata_short_size(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "short100000.safetensors"
    write_config_safetensors(path, test_image_short_size=100000)  # 320x240 -> 133333x100000 px
    return _predict(ctx, path)


def m_metadata_classes(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "classes.safetensors"
    write_config_safetensors(path, num_classes=10**7)
    return _predict(ctx, path)


def m_metadata_channels_serve(ctx: Ctx) -> Callable[[], Outcome]:
    path = ctx.work / "wide.safetensors"
    write_config_safetensors(path, fpn_out_channels=10**6)  # a 10^6 x 10^6 x 3 x 3 conv
    return lambda: ctx.cli("serve", "--weights", str(path))


def _download(ctx: Ctx, *, declare_length: bool) -> Callable[[], Outcome]:
    """``predict --model R18`` without weights downloads the official file, here from a server whose
    answer (2 MB) is over the (lowered, 1 MB) checkpoint size limit."""
    base = ctx.weights_server(b"\x80" * 2_000_000, declare_length=declare_length)
    ctx.monkeypatch.setenv("ATSSDET_URL_BASE", base)
    ctx.monkeypatch.setenv("ATSSDET_HOME", str(ctx.work / "cache"))
    ctx.monkeypatch.setenv("ATSSDET_MAX_CHECKPOINT_BYTES", "1000000")
    image = ctx.work / "small.png"
    image.write_bytes(encode(np.zeros((240, 320, 3), np.uint8)))
    return lambda: ctx.cli("predict", str(image), "--model", R18, "--out", str(ctx.work / "out"))


def m_download_declared_too_large(ctx: Ctx) -> Callable[[], Outcome]:
    return _download(ctx, declare_length=True)


def m_download_endless(ctx: Ctx) -> Callable[[], Outcome]:
    return _download(ctx, declare_length=False)


def m_header_bomb_upload(ctx: Ctx) -> Callable[[], Outcome]:
    app = ctx.app()
    return lambda: http_call(app, "POST", "/v1/detect", **upload("huge.png", header_only_png(50000, 50000)))


def m_pixels_in_flight(ctx: Ctx) -> Callable[[], Outcome]:
    app = ctx.app(max_inflight_megapixels=1.0)
    synth = ctx.fx["uploads"]["synth_1000x700.png"]  # 0.7 MP each: the second does not fit
    return lambda: while_busy(app, ("first.png", synth), ("second.png", synth))


def m_image_over_budget(ctx: Ctx) -> Callable[[], Outcome]:
    app = ctx.app(max_inflight_megapixels=0.5)
    synth = ctx.fx["uploads"]["synth_1000x700.png"]
    return lambda: http_call(app, "POST", "/v1/detect", **upload("synth_1000x700.png", synth))


def m_queue_full(ctx: Ctx) -> Callable[[], Outcome]:
    app = ctx.app(max_queue=1, max_wait_ms=0)
    cat = ctx.fx["uploads"]["cat.jpg"]
    entered, release = blocked_worker(app)

    def run() -> Outcome:
        async def go() -> httpx.Response:
            async with client(app) as c:
                first = asyncio.create_task(c.post("/v1/detect", **upload("a.jpg", cat)))
                await until(entered)  # a.jpg runs; b.jpg fills the queue of 1
                second = asyncio.create_task(c.post("/v1/detect", **upload("b.jpg", cat)))
                for _ in range(3000):
                    if app.state.batcher.pending:
                        break
                    await asyncio.sleep(0.01)
                try:
                    refused = await c.post("/v1/detect", **upload("c.jpg", cat))
                finally:
                    release.set()
                assert (await first).status_code == 200 and (await second).status_code == 200
                return refused

        return answer(asyncio.run(go()))

    return run


def _guarded(ctx: Ctx, **policy: Any) -> Any:
    return ctx.app(access=AccessPolicy.for_address("127.0.0.1", **policy))


def e_host_rebinding(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    return lambda: http_call(app, "GET", "/v1/models", headers={"Host": "attacker.example"})


def e_host_rebinding_post(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    headers = {"Host": "rebind.test:8000", "Origin": "http://rebind.test:8000"}  # same-origin to the browser
    return lambda: http_call(
        app, "POST", "/v1/detect", headers=headers, **upload("cat.jpg", ctx.fx["uploads"]["cat.jpg"])
    )


def e_missing_token(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx, token=TOKEN)
    return lambda: http_call(app, "POST", "/v1/detect", **upload("cat.jpg", ctx.fx["uploads"]["cat.jpg"]))


def e_wrong_token(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx, token=TOKEN)
    headers = {"Authorization": "Bearer guess"}
    return lambda: http_call(app, "GET", "/v1/models", headers=headers)


def e_token_on_schema(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx, token=TOKEN)
    return lambda: http_call(app, "GET", "/openapi.json", headers={"Authorization": f"Basic {TOKEN}"})


def e_cross_origin_post(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    headers = {"Origin": "http://evil.example"}
    return lambda: http_call(
        app, "POST", "/v1/detect", headers=headers, **upload("cat.jpg", ctx.fx["uploads"]["cat.jpg"])
    )


def e_null_origin(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    return lambda: http_call(app, "GET", "/v1/models", headers={"Origin": "null"})


def e_origin_not_listed(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx, cors_origins=["https://app.example"])
    return lambda: http_call(app, "GET", "/v1/models", headers={"Origin": "https://other.example"})


def e_preflight_without_cors(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    return lambda: http_call(app, "OPTIONS", "/v1/detect", headers=headers)


def e_inference_error_body(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)

    def failing(images: list[np.ndarray], options: Any) -> list[Detections]:
        raise cv2.error(
            "OpenCV(4.10) /io/opencv/modules/imgproc/src/resize.cpp:4155: error: (-215) !dsize.empty()"
        )

    app.state.batcher.detect = failing
    return lambda: http_call(app, "POST", "/v1/detect", **upload("cat.jpg", ctx.fx["uploads"]["cat.jpg"]))


def e_unexpected_error_body(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)
    app.state.served = None  # every route that reads it fails with an AttributeError
    return lambda: http_call(app, "GET", "/v1/models", raise_app_exceptions=False)


def e_decoder_error_body(ctx: Ctx) -> Callable[[], Outcome]:
    app = _guarded(ctx)

    def broken(*args: Any) -> None:
        raise cv2.error("OpenCV(4.10) /io/opencv/modules/imgcodecs/src/loadsave.cpp:802: error: (-215)")

    ctx.monkeypatch.setattr("atssdet.data.image_io.cv2.imdecode", broken)
    return lambda: http_call(
        app, "POST", "/v1/detect", **upload("photo.png", ctx.fx["uploads"]["synth_600x900.png"])
    )


def e_slow_body(ctx: Ctx) -> Callable[[], Outcome]:
    app = ctx.app(body_timeout_s=0.5)
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="slow.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    async def trickle() -> Any:
        yield head
        await asyncio.sleep(5)  # the rest never comes in time
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    return lambda: http_call(app, "POST", "/v1/detect", content=trickle(), headers=headers)


def _serve(ctx: Ctx, *args: str) -> Callable[[], Outcome]:
    ctx.monkeypatch.delenv("ATSSDET_TOKEN", raising=False)
    return lambda: ctx.cli("serve", "--model", R18, "--weights", str(ctx.fx["r18_checkpoint"]), *args)


def e_public_bind_without_token(ctx: Ctx) -> Callable[[], Outcome]:
    return _serve(ctx, "--host", "0.0.0.0")


def e_lan_bind_without_token(ctx: Ctx) -> Callable[[], Outcome]:
    return _serve(ctx, "--host", "192.0.2.10", "--allowed-host", "detector.lan")


def e_empty_token(ctx: Ctx) -> Callable[[], Outcome]:
    return _serve(ctx, "--host", "0.0.0.0", "--token", " ")


def i_mixed_batch(ctx: Ctx) -> Callable[[], Outcome]:
    """cat, synth, a 3x4000 strip and a corrupt PNG sent together; the corrupt one's answer is the
    case's outcome, the valid ones must equal their results alone."""
    app = ctx.app(max_batch=3, max_wait_ms=5000)  # the three valid ones close the batch at once
    up = ctx.fx["uploads"]
    thin = encode(np.full((3, 4000, 3), 127, np.uint8))
    corrupt = up["synth_600x900.png"][:2000]
    names = [
        ("cat.jpg", up["cat.jpg"]),
        ("thin.png", thin),
        ("synth.png", up["synth_600x900.png"]),
        ("corrupt.png", corrupt),
    ]

    def run() -> Outcome:
        async def go() -> list[httpx.Response]:
            async with client(app) as c:
                return list(await asyncio.gather(*(c.post("/v1/detect", **upload(n, d)) for n, d in names)))

        cat, strip, synth, bad = asyncio.run(go())
        for resp, key in ((cat, "cat.jpg"), (synth, "synth_600x900.png")):
            assert resp.status_code == 200, resp.text
            assert_dets_match(_as_array(resp.json()), ctx.fx["alone"][key])
        # The strip is valid: it is served (every resized side >= 1 px).
        assert strip.status_code == 200, strip.text
        return answer(bad)

    return run


def i_failing_image(ctx: Ctx) -> Callable[[], Outcome]:
    """A batch whose detect call fails because of one image (7 px wide): the others are run again
    alone and get exactly their own detections."""
    app = ctx.app(max_batch=3, max_wait_ms=5000)
    real = app.state.batcher.detect
    sizes: list[int] = []

    def detect(images: list[np.ndarray], options: Any) -> list[Detections]:
        sizes.append(len(images))
        if any(im.shape[1] == 7 for im in images):
            raise RuntimeError("simulated failure of a 7 px wide image")
        return cast(list[Detections], real(images, options))

    app.state.batcher.detect = detect
    up = ctx.fx["uploads"]
    names = [
        ("cat.jpg", up["cat.jpg"]),
        ("seven.png", encode(np.zeros((50, 7, 3), np.uint8))),
        ("synth.png", up["synth_600x900.png"]),
    ]

    def run() -> Outcome:
        async def go() -> list[httpx.Response]:
            async with client(app) as c:
                return list(await asyncio.gather(*(c.post("/v1/detect", **upload(n, d)) for n, d in names)))

        cat, seven, synth = asyncio.run(go())
        for resp, key in ((cat, "cat.jpg"), (synth, "synth_600x900.png")):
            assert resp.status_code == 200, resp.text
            assert_dets_match(_as_array(resp.json()), ctx.fx["alone"][key])
        assert sizes == [3, 1, 1, 1], sizes  # the shared call failed, then each ran alone
        return answer(seven)

    return run


def _as_array(body: dict[str, Any]) -> np.ndarray:
    boxes = np.asarray(body["boxes"], dtype=np.float64).reshape(-1, 4)
    return np.column_stack((boxes, body["scores"], body["labels"]))


@dataclass(frozen=True)
class Case:
    kind: str  # "memory" (small inputs, a lot of memory), "exposure" (server), "isolation"
    prepare: Prepare
    status: int  # expected exit code or HTTP status
    words: tuple[str, ...]  # the message names the input and the problem
    max_rss: int | None = None  # bytes (subprocess cases)
    absent: tuple[str, ...] = ()  # words the message must not contain (internals)
    headers: tuple[str, ...] = ()  # response headers that must be present


_INTERNALS = ("Error", "Traceback", "/io/opencv", ".cpp", ".py")

CASES: dict[str, Case] = {
    # Small inputs that would take a lot of memory
    "gzip bomb: 3 MB .pkl.gz unpacking to 3 GiB": Case(
        "memory", m_gzip_bomb, 2, ("bomb.pkl.gz", "decompresses to more than 2147483648 bytes"), max_rss=GB
    ),
    "32-byte pickle calling numpy.ndarray for 3.2 GB of objects": Case(
        "memory", m_object_array, 2, ("objects.pkl", "calls numpy.ndarray directly"), max_rss=GB
    ),
    "_reconstruct asked for a 10^10-element array": Case(
        "memory", m_reconstruct_shape, 2, ("shape.pkl", "unexpected numpy _reconstruct arguments")
    ),
    "array state declaring 4 GB backed by 16 bytes": Case(
        "memory", m_state_without_data, 2, ("hollow.pkl", "4000000000 bytes", "holds 16 bytes")
    ),
    "array state with an object dtype": Case(
        "memory", m_object_dtype_state, 2, ("objstate.pkl", "dtype", "numeric arrays only")
    ),
    "plain .pkl larger than the cap (configured)": Case(
        "memory",
        m_plain_pickle_over_cap,
        2,
        ("big.pkl", "more than 1000000 bytes", "ATSSDET_MAX_CHECKPOINT_BYTES"),
    ),
    "reference .pkl.gz under a 50 MB cap": Case(
        "memory", m_real_gzip_over_cap, 2, (f"{R18}.seed0.pkl.gz", "decompresses to more than 50000000 bytes")
    ),
    "metadata test_image_short_size=100000": Case(
        "memory",
        m_metadata_short_size,
        2,
        ("short100000.safetensors", "test_image_short_size=100000", "[1, 8192]"),
    ),
    "metadata num_classes=10^7": Case(
        "memory", m_metadata_classes, 2, ("classes.safetensors", "num_classes=10000000", "[1, 10000]")
    ),
    "metadata fpn_out_channels=10^6 (serve)": Case(
        "memory", m_metadata_channels_serve, 2, ("wide.safetensors", "fpn_out_channels=1000000")
    ),
    "download announcing more than the cap": Case(
        "memory",
        m_download_declared_too_large,
        2,
        (ZOO[R18].filename, "announces 2000000 bytes, more than 1000000 bytes", "nothing kept"),
    ),
    "download without a length running past the cap": Case(
        "memory", m_download_endless, 2, (ZOO[R18].filename, "the download is more than 1000000 bytes")
    ),
    "upload whose header declares 50000x50000": Case(
        "memory", m_header_bomb_upload, 413, ("huge.png", "2500000000 pixels", "in-flight budget")
    ),
    "upload while the pixel budget is held": Case(
        "memory", m_pixels_in_flight, 503, ("second.png", "server busy", "pixels"), headers=("retry-after",)
    ),
    "upload larger than the whole pixel budget": Case(
        "memory", m_image_over_budget, 413, ("synth_1000x700.png", "700000 pixels", "in-flight budget")
    ),
    "upload while the request queue is full": Case(
        "memory", m_queue_full, 503, ("c.jpg", "requests already waiting"), headers=("retry-after",)
    ),
    # Server exposure
    "Host of another name (DNS rebinding)": Case(
        "exposure",
        e_host_rebinding,
        400,
        ("'attacker.example'", "not a name of this server", "--allowed-host"),
    ),
    "rebinding page posting same-origin to itself": Case(
        "exposure", e_host_rebinding_post, 400, ("'rebind.test:8000'", "not a name of this server")
    ),
    "POST without the token": Case(
        "exposure",
        e_missing_token,
        401,
        ("/v1/detect", "missing token", "Bearer"),
        headers=("www-authenticate",),
    ),
    "wrong token": Case("exposure", e_wrong_token, 401, ("/v1/models", "wrong token")),
    "token sent with another scheme": Case(
        "exposure", e_token_on_schema, 401, ("/openapi.json", "wrong token")
    ),
    "simple cross-origin POST": Case(
        "exposure", e_cross_origin_post, 403, ("'http://evil.example'", "may not call", "--cors-origin")
    ),
    "Origin null (sandboxed page, file://)": Case("exposure", e_null_origin, 403, ("'null'", "may not call")),
    "origin not in --cors-origin": Case(
        "exposure", e_origin_not_listed, 403, ("'https://other.example'", "may not call")
    ),
    "CORS preflight with CORS off": Case(
        "exposure", e_preflight_without_cors, 403, ("'https://app.example'", "cross-origin requests are off")
    ),
    "inference error with an OpenCV path": Case(
        "exposure",
        e_inference_error_body,
        500,
        ("cat.jpg", "inference failed", "request id"),
        absent=_INTERNALS,
    ),
    "unexpected error in a route": Case(
        "exposure",
        e_unexpected_error_body,
        500,
        ("/v1/models", "internal error", "request id"),
        absent=(*_INTERNALS, "NoneType"),
    ),
    "decoder error with an OpenCV path": Case(
        "exposure", e_decoder_error_body, 422, ("photo.png", "corrupt PNG data"), absent=_INTERNALS
    ),
    "body trickling in past the body timeout": Case(
        "exposure", e_slow_body, 408, ("request body", "within 0.5 s")
    ),
    "serve on 0.0.0.0 without a token": Case(
        "exposure",
        e_public_bind_without_token,
        2,
        ("--host 0.0.0.0", "not a loopback address", "--token", "ATSSDET_TOKEN"),
    ),
    "serve on a LAN address without a token": Case(
        "exposure", e_lan_bind_without_token, 2, ("--host 192.0.2.10", "not a loopback address", "--token")
    ),
    "serve with an empty token": Case("exposure", e_empty_token, 2, ("--token", "empty")),
    # One bad image in a server batch
    "mixed batch: cat, 3x4000 strip, synth, corrupt PNG": Case(
        "isolation", i_mixed_batch, 422, ("corrupt.png", "truncated PNG")
    ),
    "batch whose detect call fails for one image": Case(
        "isolation", i_failing_image, 500, ("seven.png", "inference failed", "request id"), absent=_INTERNALS
    ),
}


@pytest.fixture(scope="module")
def small_detector(r18_checkpoint: Path) -> Detector:
    return Detector(load(R18, weights=r18_checkpoint, overrides=SMALL))


@pytest.fixture(scope="module")
def uploads(reference_dir: Path) -> dict[str, bytes]:
    names = ("cat.jpg", "synth_600x900.png", "synth_1000x700.png")
    return {n: (reference_dir / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def alone(small_detector: Detector, uploads: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Each image's detections run alone (batch of one)."""
    out = {}
    for name, data in uploads.items():
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        (d,) = small_detector.predict([image], batch_size=1)
        out[name] = d.to_array().numpy()
    return out


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if c.max_rss else []) for n, c in CASES.items()]
)
def test_case(name, tmp_path, capsys, monkeypatch, request) -> None:
    case = CASES[name]
    fixtures = {
        key: request.getfixturevalue(key) for key in ("small_detector", "uploads", "alone", "r18_checkpoint")
    }
    work = tmp_path / "work"
    work.mkdir()
    ctx = Ctx(work, fixtures, capsys, monkeypatch)
    try:
        action = case.prepare(ctx)
        before = snapshot_files(work)
        outcome = action()
        after = snapshot_files(work)
    finally:
        ctx.close()
    assert outcome.status == case.status, (outcome.status, outcome.message)
    for word in case.words:
        assert word in outcome.message, (word, outcome.message)
    for word in case.absent:
        assert word not in outcome.message, (word, outcome.message)
    for header in case.headers:
        assert header in {k.lower() for k in outcome.headers}, (header, outcome.headers)
    assert after == before, "files changed, added or removed"
    if case.max_rss is not None:
        assert outcome.peak_rss is not None and outcome.peak_rss < case.max_rss, outcome.peak_rss
        print(f"\n{name}: exit {outcome.status}, peak RSS {outcome.peak_rss / 2**20:.0f} MiB")


def test_case_table_counts() -> None:
    kinds = collections.Counter(case.kind for case in CASES.values())
    assert kinds["memory"] >= 6 and kinds["exposure"] >= 8 and kinds["isolation"] >= 1, kinds


# --------------------------------------------------------------------------------------------------
# What the access checks let through
# --------------------------------------------------------------------------------------------------


def test_access_policy_lets_its_own_requests_through(small_detector, uploads) -> None:
    cat = uploads["cat.jpg"]
    policy = AccessPolicy.for_address(
        "127.0.0.1", token=TOKEN, allowed_hosts=["detector.lan"], cors_origins=["https://app.example/"]
    )
    app = create_app(small_detector, model_name=R18, access=policy)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        assert http_call(app, "GET", "/").status == 200  # the page asks for the token itself
        assert http_call(app, "GET", "/healthz").status == 200
        for host in ("127.0.0.1:8000", "localhost:8000", "detector.lan", "[::1]:8000", "LOCALHOST."):
            assert http_call(app, "GET", "/v1/models", headers={"Host": host, **auth}).status == 200, host
        same_origin = {"Origin": BASE, **auth}
        assert (
            http_call(app, "POST", "/v1/detect", headers=same_origin, **upload("cat.jpg", cat)).status == 200
        )
        listed = http_call(app, "GET", "/v1/models", headers={"Origin": "https://app.example", **auth})
        assert listed.status == 200 and listed.headers["access-control-allow-origin"] == "https://app.example"
        preflight = http_call(
            app,
            "OPTIONS",
            "/v1/detect",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert (
            preflight.status == 200
            and "authorization" in preflight.headers["access-control-allow-headers"].lower()
        )
        assert http_call(app, "GET", "/docs", headers=auth).status == 404  # off by default: it loads a CDN
        assert http_call(app, "GET", "/openapi.json", headers=auth).status == 200
    finally:
        app.state.batcher.stop()


def test_policy_for_each_kind_of_address(monkeypatch) -> None:
    loop = AccessPolicy.for_address("127.0.0.1")
    assert loop.allowed_hosts == ("127.0.0.1", "localhost", "::1") and loop.token is None
    assert AccessPolicy.for_address("0.0.0.0", token="t").allowed_hosts is None  # any name; token guards
    lan = AccessPolicy.for_address("0.0.0.0", token="t", allowed_hosts=["Detector.LAN:8000"])
    assert lan.allowed_hosts == ("detector.lan", "localhost", "127.0.0.1", "::1")
    assert AccessPolicy.for_address("::1").allowed_hosts == ("::1", "localhost", "127.0.0.1")
    monkeypatch.setenv("ATSSDET_TOKEN", "from-env")
    with pytest.raises(ValueError, match="--token"):
        AccessPolicy.for_address("10.0.0.5")  # the library never reads the environment itself


# --------------------------------------------------------------------------------------------------
# The real server: 16 concurrent 10000x10000 uploads, a slow header, then normal service
# --------------------------------------------------------------------------------------------------


def _vm(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert match, text
    return int(match.group(1)) * 1024


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    data = png_bytes(10000, 10000)
    assert len(data) < 400_000  # ~300 KB that decode to 300 MB
    return data


@pytest.fixture
def served(tmp_path, r18_checkpoint) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("ATSSDET_TOKEN", None)
    args = [
        sys.executable, "-m", "atssdet", "serve", "--model", R18, "--weights", str(r18_checkpoint),
        "--set", "test_image_short_size=320", "--set", "test_image_max_size=512", "--port", "0",
        "--device", "cpu", "--header-timeout", "1", "--log-level", "warning",
    ]  # fmt: skip
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, env=env)
    killer = threading.Timer(540, proc.kill)  # bounded, whatever happens below
    killer.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # EOF (b"") if the server died
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, (line, (tmp_path / "server.log").read_text())
        yield proc, f"http://127.0.0.1:{match.group(1)}"
    finally:
        killer.cancel()
        proc.kill()
        proc.wait(30)


@pytest.mark.slow
def test_server_under_16_huge_uploads(served, huge_png, uploads) -> None:
    proc, url = served
    with httpx.Client(base_url=url, timeout=120) as c:
        assert c.get("/healthz").status_code == 200
    start_rss = _vm(proc.pid, "VmRSS")

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
            posts = (c.post("/v1/detect", files={"file": (f"big{i}.png", huge_png)}) for i in range(16))
            return list(await asyncio.gather(*posts))

    responses = asyncio.run(burst())
    statuses = collections.Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 429, 503}, [(r.status_code, r.text) for r in responses]
    assert statuses[200] >= 1, statuses
    for r in responses:
        if r.status_code != 200:
            assert "retry-after" in r.headers and re.search(r"big\d+\.png: server busy", r.json()["error"]), (
                r.text
            )
        else:
            assert r.json()["image"] == {"width": 10000, "height": 10000}
    peak = _vm(proc.pid, "VmHWM")
    assert peak < 3 * GB, peak

    with httpx.Client(base_url=url, timeout=120) as c:  # serves normally afterwards
        resp = c.post("/v1/detect", files={"file": ("cat.jpg", uploads["cat.jpg"])})
        assert resp.status_code == 200 and len(resp.json()["scores"]) > 0
        assert c.get("/v1/models", headers={"Host": "attacker.example"}).status_code == 400
    after_rss = _vm(proc.pid, "VmRSS")
    print(
        f"\nserver RSS: start {start_rss / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, after "
        f"{after_rss / 2**20:.0f} MiB; answers {dict(statuses)}"
    )

    # A connection whose headers never finish is closed after --header-timeout (1 s), not kept.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server (recv would time out after 30 s)
        assert time.monotonic() - started < 25
