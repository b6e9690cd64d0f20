"""Pretrained download: served over HTTP on 127.0.0.1 from a checkpoint made here from the manifest."""

from __future__ import annotations

import collections
import http.server
import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from atssdet.convert import CheckpointError
from atssdet.download import DownloadError, cache_status, converted_path, fetch_pretrained, raw_path
from atssdet.loader import load
from atssdet.zoo import ZOO

R18 = "atss_res18_coco_3x_800size"
ENTRY = ZOO[R18]


@pytest.fixture(scope="session")
def manifest_checkpoint(reference_dir: Path) -> tuple[bytes, collections.OrderedDict[str, np.ndarray]]:
    """A hub-format MegEngine file: protocol-4 pickle of an OrderedDict of float32 arrays (biases (1,C,1,1))."""
    manifest = json.loads((reference_dir / f"manifest_{R18}.json").read_text())
    rng = np.random.default_rng(0)
    arrays: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
    for item in manifest["state_dict"]:
        arrays[item["key"]] = (rng.standard_normal(item["shape"], dtype=np.float32) * 0.05).astype(np.float32)
    return pickle.dumps(arrays, protocol=4), arrays


class _Server:
    """Serves ``routes[path] = (body, mode)``. Modes: "ok"; "truncate" (full Content-Length, half the
    body, then the connection closes); "cut" (no Content-Length, half the body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                server.requests.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, mode = server.routes[self.path]
                self.send_response(200)
                if mode != "cut":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body if mode == "ok" else body[: len(body) // 2])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}/mirror/"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.stop()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("ATSSDET_HOME", str(home))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_convert_cache_then_offline(
    server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch, manifest_checkpoint
) -> None:
    body, arrays = manifest_checkpoint
    server.routes["/mirror/" + ENTRY.filename] = (body, "ok")
    monkeypatch.setenv("ATSSDET_URL_BASE", server.base.rstrip("/"))  # the base works with or without "/"
    assert ENTRY.url == server.base + ENTRY.filename

    model = load(R18, pretrained=True)
    assert server.requests == ["/mirror/" + ENTRY.filename]
    assert _files(cache) == sorted([ENTRY.filename, f"{R18}.safetensors"])  # no temp files left
    assert raw_path(ENTRY).read_bytes() == body
    assert cache_status(ENTRY) == "converted"
    state = model.state_dict()
    torch.testing.assert_close(
        state["head.cls_score.bias"], torch.from_numpy(arrays["head.cls_score.bias"]).reshape(80)
    )
    torch.testing.assert_close(
        state["backbone.bottom_up.conv1.weight"], torch.from_numpy(arrays["backbone.bottom_up.conv1.weight"])
    )

    # Offline: server gone, the converted safetensors is used (no .pkl needed either).
    server.stop()
    raw_path(ENTRY).unlink()
    again = load(R18, pretrained=True)
    assert len(server.requests) == 1
    torch.testing.assert_close(again.state_dict()["head.scale_list"], state["head.scale_list"])
    # torch.hub goes through the same cache.
    hub_model = torch.hub.load(str(Path(__file__).resolve().parents[1]), R18, source="local", pretrained=True)
    torch.testing.assert_close(hub_model.state_dict()["head.ctrness.weight"], state["head.ctrness.weight"])


@pytest.mark.parametrize("case", ["truncated", "cut_without_length", "garbage", "wrong_keys", "not_found"])
def test_bad_downloads_leave_nothing_trusted(
    case: str, server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch, manifest_checkpoint
) -> None:
    monkeypatch.setenv("ATSSDET_URL_BASE", server.base)
    good_shapes = collections.OrderedDict(
        [
            ("backbone.bottom_up.conv1.weight", np.zeros((64, 3, 7, 7), np.float32)),
            ("nonsense.key", np.ones(3, np.float32)),
        ]
    )
    bodies = {
        "truncated": (manifest_checkpoint[0], "truncate"),
        "cut_without_length": (manifest_checkpoint[0], "cut"),
        "garbage": (bytes(range(256)) * 64, "ok"),
        "wrong_keys": (pickle.dumps(good_shapes, protocol=4), "ok"),
    }
    if case in bodies:
        server.routes["/mirror/" + ENTRY.filename] = bodies[case]
    expected = {
        "truncated": "truncated",
        "cut_without_length": "corrupt or truncated pickle",
        "garbage": "not a pickle",
        "wrong_keys": "unexpected key nonsense.key",
        "not_found": "HTTP 404",
    }[case]
    with pytest.raises(DownloadError) as info:
        load(R18, pretrained=True)
    message = str(info.value)
    assert expected in message
    assert ENTRY.url in message  # names the URL that failed
    assert str(raw_path(ENTRY)) in message and "weights=" in message  # how to place it by hand
    assert _files(cache) == []  # no partial, temp or converted file a later run could trust
    assert cache_status(ENTRY) == "no"


def test_unreachable_server_and_bad_hand_placed_file(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATSSDET_URL_BASE", "http://127.0.0.1:9/")  # discard port: connection refused
    with pytest.raises(DownloadError, match="cannot connect") as info:
        fetch_pretrained(ENTRY, progress=False)
    assert "http://127.0.0.1:9/" + ENTRY.filename in str(info.value)
    # A file put in the cache by hand is verified before use, and kept (it is the user's file).
    raw_path(ENTRY).write_bytes(b"\x80\x04 definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="delete it to download again") as info2:
        fetch_pretrained(ENTRY, progress=False)
    assert str(raw_path(ENTRY)) in str(info2.value)
    assert not converted_path(ENTRY).exists() and raw_path(ENTRY).exists()
