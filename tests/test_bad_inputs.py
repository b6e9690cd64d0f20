"""Acceptance table of bad inputs (issue 8): each gives a clear error naming the input and the problem.

Four groups: images (``read_image``), annotation files (``COCODetection``), checkpoints
(``load_weights``) and command-line flags (``atssdet.cli.main`` in-process; exit status 2 and an
``atssdet CMD: error: ...`` line). Each case builds its input under ``tmp_path`` and returns what to
run plus the fragments the message must contain (the input's name and the problem). A second table
holds the unusual-but-valid images that must decode exactly as ``cv2.imread`` does.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from atssdet.cli import build_parser, main
from atssdet.convert import CheckpointError, load_weights, save_safetensors
from atssdet.data.coco import COCODetection, DatasetError
from atssdet.data.image_io import MAX_PIXELS_ENV, ImageReadError, read_image
from atssdet.modeling.atss import build_model
from tests.coco_synth import TINY_CFG
from tests.helpers import tiff_header

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 255, (24, 32, 3), dtype=np.uint8)


@dataclass
class Setup:
    run: Callable[[], Any]  # raises the expected error (or, for CLI cases, returns the exit status)
    expect: list[str]  # fragments the error message must contain


def _png_bytes(image: np.ndarray = PICTURE) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def _jpg_bytes(image: np.ndarray = PICTURE) -> bytes:
    return cv2.imencode(".jpg", image)[1].tobytes()


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _bomb_png() -> bytes:
    """A 1x1 PNG whose header claims 50000 x 50000 pixels (valid CRC)."""
    data = bytearray(_png_bytes(PICTURE[:1, :1]))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes of header data
    ihdr[4:12] = struct.pack(">II", 50000, 50000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


# ---------------------------------------------------------------- images


def _image_case(name: str, data: bytes, *fragments: str) -> Callable[[Path], Setup]:
    def setup(tmp: Path) -> Setup:
        path = _write(tmp / name, data)
        return Setup(lambda: read_image(path), [str(path), *fragments])

    return setup


def _image_directory(tmp: Path) -> Setup:
    (tmp / "folder.jpg").mkdir()
    return Setup(lambda: read_image(tmp / "folder.jpg"), [str(tmp / "folder.jpg"), "cannot read"])


def _image_missing(tmp: Path) -> Setup:
    return Setup(lambda: read_image(tmp / "gone.png"), [str(tmp / "gone.png"), "No such file"])


def _image_fifo(tmp: Path) -> Setup:
    os.mkfifo(tmp / "pipe.png")  # read_image must not block waiting for a writer
    return Setup(
        lambda: read_image(tmp / "pipe.png"), [str(tmp / "pipe.png"), "not a regular file but a FIFO"]
    )


def _image_symlink_loop(tmp: Path) -> Setup:
    os.symlink(tmp / "b.png", tmp / "a.png")
    os.symlink(tmp / "a.png", tmp / "b.png")
    return Setup(lambda: read_image(tmp / "a.png"), [str(tmp / "a.png"), "symbolic links (a symlink loop)"])


def _image_env_limit(tmp: Path) -> Setup:
    path = _write(tmp / "big.png", _png_bytes())

    def run() -> Any:
        os.environ[MAX_PIXELS_ENV] = "100"
        try:
            return read_image(path)
        finally:
            del os.environ[MAX_PIXELS_ENV]

    return Setup(run, [str(path), "32x24 = 768 pixels, above the limit of 100", MAX_PIXELS_ENV])


_jpg = _jpg_bytes()
IMAGE_CASES: dict[str, tuple[Callable[[Path], Setup], type[Exception]]] = {
    "image-zero-bytes": (_image_case("empty.jpg", b"", "empty file (0 bytes)"), ImageReadError),
    "image-not-an-image": (_image_case("notes.jpg", "hello, world", "not an image"), ImageReadError),
    "image-truncated-jpeg": (
        _image_case("half.jpg", _jpg[: len(_jpg) // 2], "truncated JPEG"),
        ImageReadError,
    ),
    "image-truncated-png": (
        _image_case("half.png", _png_bytes()[:300], "truncated PNG"),
        ImageReadError,
    ),
    "image-corrupt-png": (
        _image_case("garbled.png", _png_bytes()[:40] + b"\0" * 200 + _png_bytes()[-12:], "corrupt"),
        ImageReadError,
    ),
    "image-decompression-bomb": (
        _image_case("bomb.png", _bomb_png(), "50000x50000 = 2500000000 pixels, above the limit of 100000000"),
        ImageReadError,
    ),
    "image-pixel-limit-from-env": (_image_env_limit, ImageReadError),
    "image-fifo": (_image_fifo, ImageReadError),
    "image-symlink-loop": (_image_symlink_loop, ImageReadError),
    "image-bomb-beyond-pillow-limit": (  # Pillow refuses to open it; the real size is still reported
        _image_case("huge.tif", tiff_header(15000, 15000), "15000x15000 = 225000000 pixels"),
        ImageReadError,
    ),
    "image-is-a-directory": (_image_directory, ImageReadError),
    "image-missing": (_image_missing, ImageReadError),
}

# ---------------------------------------------------------------- annotation files

VALID_DOC: dict[str, Any] = {
    "images": [{"id": 1, "file_name": "a.png", "height": 24, "width": 32}],
    "categories": [{"id": 1, "name": "cat"}],
    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12], "iscrowd": 0}],
}


def _doc(**changes: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(VALID_DOC))
    for section, patch in changes.items():
        if isinstance(patch, dict):
            doc[section][0].update(patch)
        else:
            doc[section] = patch
    return doc


def _ann_case(content: Any, *fragments: str) -> Callable[[Path], Setup]:
    def setup(tmp: Path) -> Setup:
        text = content if isinstance(content, str) else json.dumps(content)
        path = _write(tmp / "instances.json", text)
        return Setup(
            lambda: COCODetection(path, tmp, remove_images_without_annotations=True), [str(path), *fragments]
        )

    return setup


def _ann_missing(tmp: Path) -> Setup:
    path = tmp / "nope.json"
    return Setup(
        lambda: COCODetection(path, tmp, remove_images_without_annotations=True),
        [str(path), "annotation file not found"],
    )


def _ann_size_mismatch(tmp: Path) -> Setup:
    path = _write(tmp / "instances.json", json.dumps(VALID_DOC))
    image = _write(tmp / "a.png", _png_bytes(PICTURE[:10, :10]))
    dataset = COCODetection(path, tmp, remove_images_without_annotations=True)
    return Setup(lambda: dataset[0], [str(image), "10x10 (HxW)", "24x32 for image id 1"])


ANNOTATION_CASES: dict[str, tuple[Callable[[Path], Setup], type[Exception]]] = {
    "ann-missing-file": (_ann_missing, DatasetError),
    "ann-invalid-json": (_ann_case('{"images": [', "not valid JSON"), DatasetError),
    "ann-not-an-object": (_ann_case([1, 2], "expected a JSON object", "got list"), DatasetError),
    "ann-missing-images": (
        _ann_case({"categories": [{"id": 1, "name": "a"}]}, "missing top-level key 'images'"),
        DatasetError,
    ),
    "ann-unknown-category": (
        _ann_case(
            _doc(annotations=[{"image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]}]),
            "unknown category_id 9",
        ),
        DatasetError,
    ),
    "ann-nan-box": (
        _ann_case(_doc(annotations={"bbox": [1, float("nan"), 2, 2]}), "annotations[0] (id 1)", "non-finite"),
        DatasetError,
    ),
    "ann-bool-category-id": (  # found by the fuzzer: numpy read true as 1
        _ann_case(
            _doc(
                annotations=[
                    *VALID_DOC["annotations"],
                    {"image_id": 1, "category_id": True, "bbox": [1, 1, 2, 2]},
                ]
            ),
            "annotations[1]",
            "'category_id' must be an integer, got True",
        ),
        DatasetError,
    ),
    "ann-huge-integer-box": (  # found by the fuzzer: OverflowError escaped
        _ann_case(_doc(annotations={"bbox": [10**400, 1, 2, 2]}), "annotations[0] (id 1)", "non-finite"),
        DatasetError,
    ),
    "ann-huge-image-height": (
        _ann_case(
            _doc(images={"height": 10**400}), "images[0] (id 1)", "'height' must be a positive integer"
        ),
        DatasetError,
    ),
    "ann-duplicate-image-id": (
        _ann_case(_doc(images=[VALID_DOC["images"][0]] * 2), "duplicate image id 1"),
        DatasetError,
    ),
    "ann-image-size-mismatch": (_ann_size_mismatch, DatasetError),
}

# ---------------------------------------------------------------- checkpoints


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch PWNED",))


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(TINY_CFG).state_dict()


def _ckpt_case(name: str, make: Callable[[Path, dict[str, torch.Tensor]], None], *fragments: str):
    def setup(tmp: Path, state: dict[str, torch.Tensor]) -> Setup:
        path = tmp / name
        make(path, state)
        return Setup(lambda: load_weights(build_model(TINY_CFG), path), [str(path), *fragments])

    return setup


def _malicious_pkl(path: Path, state: dict[str, torch.Tensor]) -> None:
    with open(path, "wb") as f:
        pickle.dump(collections.OrderedDict(w=_RunsCode()), f, protocol=4)


def _corrupt_gz(path: Path, state: dict[str, torch.Tensor]) -> None:
    arrays = collections.OrderedDict((k, v.numpy()) for k, v in list(state.items())[:4])
    data = bytearray(gzip.compress(pickle.dumps(arrays, protocol=4)))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    path.write_bytes(bytes(data))


def _pt_non_tensor(path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({**state, "epoch": 3, "note": "hi"}, path)


def _pt_object(path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({"model": state, "payload": _RunsCode()}, path)


def _wrong_config(path: Path, state: dict[str, torch.Tensor]) -> None:
    cfg = TINY_CFG.__class__(**{**TINY_CFG.__dict__, "num_classes": 2, "class_names": ("a", "b")})
    save_safetensors(build_model(cfg).state_dict(), path, cfg=cfg)


CHECKPOINT_CASES: dict[str, Callable[[Path, dict[str, torch.Tensor]], Setup]] = {
    "ckpt-unsupported-suffix": _ckpt_case(
        "weights.bin", lambda p, s: p.write_bytes(b"x"), "unsupported checkpoint type '.bin'"
    ),
    "ckpt-malicious-pickle": _ckpt_case("evil.pkl", _malicious_pkl, "refusing to load", "system"),
    "ckpt-corrupt-gzip": _ckpt_case("broken.pkl.gz", _corrupt_gz, "corrupt or truncated"),
    "ckpt-pt-non-tensor-values": _ckpt_case(
        "train.pt", _pt_non_tensor, "not a state dict", "'epoch': int", "'note': str"
    ),
    "ckpt-pt-arbitrary-object": _ckpt_case("obj.pth", _pt_object, "weights_only=True", "system"),
    "ckpt-pt-missing": _ckpt_case("gone.pt", lambda p, s: None, "no such file"),
    "ckpt-safetensors-garbage": _ckpt_case(
        "junk.safetensors",
        lambda p, s: p.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}......"),
        "not a valid safetensors",
    ),
    "ckpt-safetensors-wrong-config": _ckpt_case(
        "other.safetensors",
        _wrong_config,
        "was saved for another model configuration",
        "num_classes=2 (model: 3)",
    ),
}

# ---------------------------------------------------------------- command-line flags


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory, tiny_state) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    _write(root / "images" / "a.png", _png_bytes())
    ann = _write(root / "instances.json", json.dumps(VALID_DOC))
    weights = save_safetensors(tiny_state, root / "tiny.safetensors", cfg=TINY_CFG)
    return {"ann": str(ann), "images": str(root / "images"), "weights": str(weights), "root": str(root)}


def _eval(d: dict[str, str], *extra: str) -> list[str]:
    return ["eval", "--weights", d["weights"], "--data", d["ann"], "--images", d["images"], "--no-progress",
            "--out", d["root"] + "/out/r.json", *extra]  # fmt: skip


R18 = "atss_res18_coco_3x_800size"
# (argv builder, expected exit status, fragments of stderr)
CLI_CASES: dict[str, tuple[Callable[[dict[str, str]], list[str]], int, list[str]]] = {
    "cli-convert-missing-file": (
        lambda d: ["convert", d["root"] + "/nope.pkl", d["root"] + "/o.safetensors", "--model", R18],
        2,
        ["atssdet convert: error:", "nope.pkl", "No such file"],
    ),
    "cli-convert-unknown-model": (
        lambda d: ["convert", "a.pkl", "b.safetensors", "--model", "res9000"],
        2,
        ["--model", "invalid choice: 'res9000'"],
    ),
    "cli-eval-unknown-model": (
        lambda d: ["eval", "--model", "res9000", "--data", d["ann"], "--images", d["images"]],
        2,
        ["atssdet eval: error:", "unknown model 'res9000'"],
    ),
    "cli-eval-missing-weights": (
        lambda d: [
            "eval",
            "--model",
            R18,
            "--weights",
            d["root"] + "/nope.pt",
            "--data",
            d["ann"],
            "--images",
            d["images"],
        ],
        2,
        ["atssdet eval: error:", "nope.pt"],
    ),
    "cli-eval-negative-batch-size": (
        lambda d: _eval(d, "--batch-size", "-2"),
        2,
        ["atssdet eval: error:", "batch_size must be >= 1, got -2"],
    ),
    "cli-eval-bad-set-key": (
        lambda d: _eval(d, "--set", "learning_rate_typo=3"),
        2,
        ["atssdet eval: error:", "--set learning_rate_typo: no such config field"],
    ),
    "cli-eval-bad-set-type": (
        lambda d: _eval(d, "--set", "test_image_short_size=big"),
        2,
        ["atssdet eval: error:", "test_image_short_size='big': expected int"],
    ),
    "cli-eval-bad-device": (
        lambda d: _eval(d, "--device", "tpu:0"),
        2,
        ["atssdet eval: error:", "--device 'tpu:0': not a valid device"],
    ),
    "cli-eval-missing-annotations": (
        lambda d: [
            "eval",
            "--weights",
            d["weights"],
            "--data",
            d["root"] + "/none.json",
            "--images",
            d["images"],
        ],
        2,
        ["atssdet eval: error:", "none.json: annotation file not found"],
    ),
    "cli-table-missing-file": (
        lambda d: ["table", d["root"] + "/x.metrics.json"],
        2,
        ["atssdet table: error:", "x.metrics.json"],
    ),
    "cli-synth-negative-count": (
        lambda d: ["data", "synth", "--out", d["root"] + "/synth", "--num-train", "-1", "--num-val", "1"],
        2,
        ["atssdet data: error:", "--num-train/--num-val must be >= 0"],
    ),
    "cli-check-negative-examples": (
        lambda d: ["data", "check", d["ann"], "--images", d["images"], "--max-examples", "-1"],
        2,
        ["atssdet data: error:", "--max-examples must be >= 0"],
    ),
    "cli-check-missing-annotations": (  # a report, not a crash: exit status 1 (fatal problem)
        lambda d: ["data", "check", d["root"] + "/none.json", "--images", d["images"], "--no-progress"],
        1,
        ["unreadable_annotation_file", "none.json", "No such file"],
    ),
}

# Commands being written on other branches; these run once the command exists on main.
FUTURE_CLI_CASES: dict[str, tuple[Callable[[dict[str, str]], list[str]], list[str]]] = {
    "cli-predict-missing-image": (
        lambda d: ["predict", d["root"] + "/nope.jpg", "--weights", d["weights"]],
        ["nope.jpg"],
    ),
    "cli-predict-negative-batch-size": (
        lambda d: ["predict", d["images"], "--weights", d["weights"], "--batch-size", "-1"],
        ["batch"],
    ),
    "cli-train-bad-set-key": (
        lambda d: (
            ["train", "--data", d["ann"], "--images", d["images"], "--out", d["root"] + "/train"]
            + ["--set", "nonsense=1"]
        ),
        ["nonsense"],
    ),
    "cli-export-missing-weights": (
        lambda d: (
            ["export", "--model", "atss_res18_coco_3x_800size", "--weights", d["root"] + "/nope.pt"]
            + ["--out", d["root"] + "/x.onnx"]
        ),
        ["nope.pt"],
    ),
    "cli-serve-missing-weights": (lambda d: ["serve", "--weights", d["root"] + "/nope.pt"], ["nope.pt"]),
}


def _assert_names(message: str, fragments: list[str]) -> None:
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize("case", sorted({**IMAGE_CASES, **ANNOTATION_CASES}))
def test_bad_data_input(case, tmp_path):
    setup_fn, error = {**IMAGE_CASES, **ANNOTATION_CASES}[case]
    setup = setup_fn(tmp_path)
    with pytest.raises(error) as info:
        setup.run()
    _assert_names(str(info.value), setup.expect)


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoint(case, tmp_path, tiny_state, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the malicious pickle would drop its marker
    setup = CHECKPOINT_CASES[case](tmp_path, tiny_state)
    with pytest.raises(CheckpointError) as info:
        setup.run()
    _assert_names(str(info.value), setup.expect)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_cli_input(case, cli_data, capsys):
    argv, status, fragments = CLI_CASES[case]
    try:
        rc = main(argv(cli_data))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    out = capsys.readouterr()
    assert rc == status, out.err
    _assert_names(out.err + out.out, fragments)
    assert "Traceback" not in out.err


def _registered_commands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(FUTURE_CLI_CASES))
def test_bad_cli_input_future_commands(case, cli_data, capsys):
    argv, fragments = FUTURE_CLI_CASES[case]
    args = argv(cli_data)
    if args[0] not in _registered_commands():
        pytest.skip(f"`{args[0]}` is not on this branch yet")
    try:
        rc = main(args)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr()
    assert rc not in (0, None), out
    _assert_names(out.err, fragments)
    assert "Traceback" not in out.err


# ---------------------------------------------------------------- unusual but valid images


def _pil_save(path: Path, mode: str, **kwargs: Any) -> None:
    from PIL import Image

    image = Image.fromarray(PICTURE[:, :, ::-1])
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([PICTURE[:, :, ::-1], PICTURE[:, :, 0]]))
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, **kwargs)


def _exif_rotated(path: Path) -> None:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    Image.fromarray(PICTURE[:, :, ::-1]).save(path, exif=exif)


VALID_IMAGES: dict[str, Callable[[Path], None]] = {
    "gray.png": lambda p: _pil_save(p, "L"),
    "gray.jpg": lambda p: _pil_save(p, "L"),
    "rgba.png": lambda p: _pil_save(p, "RGBA"),
    "palette.png": lambda p: _pil_save(p, "P"),
    "palette.gif": lambda p: _pil_save(p, "P"),
    "cmyk.jpg": lambda p: _pil_save(p, "CMYK"),
    "bilevel.png": lambda p: _pil_save(p, "1"),
    "16bit-gray.png": lambda p: cv2.imwrite(str(p), RNG.integers(0, 65535, (9, 7), dtype=np.uint16)),
    "16bit-bgra.png": lambda p: cv2.imwrite(str(p), RNG.integers(0, 65535, (9, 7, 4), dtype=np.uint16)),
    "exif-rotated.jpg": _exif_rotated,
    "1x1.png": lambda p: cv2.imwrite(str(p), PICTURE[:1, :1]),
    "1x1.jpg": lambda p: cv2.imwrite(str(p), PICTURE[:1, :1]),
    "image.bmp": lambda p: _pil_save(p, "RGB"),
    "image.tif": lambda p: _pil_save(p, "RGB"),
    "image.webp": lambda p: _pil_save(p, "RGB"),
    "large-3000x2000.jpg": lambda p: cv2.imwrite(str(p), np.zeros((2000, 3000, 3), np.uint8)),
}


@pytest.mark.parametrize("name", sorted(VALID_IMAGES))
def test_unusual_images_decode_like_cv2_imread(name, tmp_path):
    path = tmp_path / name
    VALID_IMAGES[name](path)
    expected = cv2.imread(str(path))
    assert expected is not None
    got = read_image(path)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    if name.startswith("exif"):
        assert got.shape[:2] == (PICTURE.shape[1], PICTURE.shape[0])  # rotated by 90 degrees
