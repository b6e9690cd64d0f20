"""Fuzzing (hypothesis, derandomized, bounded): the annotation reader and image decoding raise only our errors.

* ``COCODetection`` on generated and mutated COCO JSON either loads or raises ``DatasetError``;
  ``check_dataset`` never raises and reports a fatal problem whenever the strict reader refuses the file;
  eval's ground-truth loader refuses exactly the files the reader refuses, with the same message.
* ``decode_image`` on random bytes and on truncated/bit-flipped/spliced valid PNG and JPEG files
  either returns BGR uint8 ``[H, W, 3]`` or raises ``ImageReadError``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from atssdet.data.check import CheckReport, check_dataset
from atssdet.data.coco import COCODetection
from atssdet.data.coco_records import DatasetError
from atssdet.data.image_io import ImageReadError, decode_image
from atssdet.evaluation.coco import load_ground_truth

# Hypothesis caches the constants of every module source it sees under .hypothesis/ (a new file each
# time a source changes, written while the tests are collected): keep that out of the checkout.
_HYPOTHESIS_HOME = tempfile.TemporaryDirectory(prefix="hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME.name)


# Bounded and reproducible: a fixed example sequence (derandomize), no per-example deadline (the
# machine is shared), no example database.
def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# Arbitrary JSON values, including the awkward ones: NaN/inf, huge integers, bools, nesting.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=8,
)


def _maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a valid value, sometimes anything."""
    return st.one_of(valid, valid, valid, valid, valid, valid, valid, json_values)


# few distinct ids, so that references between entries often resolve (and sometimes collide)
small_ids = st.sampled_from([1, 1, 2, 2, 3, 0, -1, 7])
# 10**400 is valid JSON but overflows a float
coord = st.one_of(
    st.integers(-50, 200), st.floats(-50, 200), st.sampled_from([float("nan"), float("inf"), 0, 10**400])
)


@st.composite
def _entry(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]]) -> Any:
    if draw(st.integers(0, 19)) == 0:
        return draw(json_values)  # not even an object
    out = {}
    for key, strategy in fields.items():
        if draw(st.integers(0, 29)) != 0:  # sometimes the key is missing
            out[key] = draw(_maybe(strategy))
    return out


images_st = st.lists(
    _entry(
        {
            "id": small_ids,
            "file_name": st.sampled_from(["a.png", "b.jpg", ""]),
            "height": st.one_of(st.integers(-1, 300), st.just(10**400)),
            "width": st.one_of(st.integers(-1, 300), st.just(10**400)),
        }
    ),
    max_size=5,
)
categories_st = st.lists(_entry({"id": small_ids, "name": st.sampled_from(["cat", "dog"])}), max_size=4)
annotations_st = st.lists(
    _entry(
        {
            "id": small_ids,
            "image_id": small_ids,
            "category_id": small_ids,
            "bbox": st.one_of(st.lists(coord, min_size=4, max_size=4), st.lists(coord, max_size=5)),
            "iscrowd": st.sampled_from([0, 1, 2, True]),
        }
    ),
    max_size=8,
)


@st.composite
def coco_documents(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not a COCO object at all
    doc: dict[str, Any] = {}
    for key, strategy in (
        ("images", images_st),
        ("categories", categories_st),
        ("annotations", annotations_st),
    ):
        if draw(st.integers(0, 9)) != 0:
            doc[key] = draw(_maybe(strategy))
    return doc


def _valid_document() -> dict[str, Any]:
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 40 + i, "width": 50 + i} for i in (1, 2, 3)],
        "categories": [{"id": 1, "name": "cat"}, {"id": 4, "name": "dog"}],
        "annotations": [
            {
                "id": k,
                "image_id": 1 + k % 3,
                "category_id": (1, 4)[k % 2],
                "bbox": [1, 2, 10, 12],
                "iscrowd": 0,
            }
            for k in range(5)
        ],
    }


awkward = st.one_of(
    json_values,
    st.sampled_from([10**400, -(10**400), 0, -1, 2**63, float("nan"), float("inf"), "", [], {}, None, True]),
)


@st.composite
def mutated_documents(draw: st.DrawFn) -> Any:
    """A valid document with 1-3 mutations: a value replaced, a key deleted or an entry duplicated."""
    doc = _valid_document()
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from(["images", "categories", "annotations"]))
        entries = doc[section]
        if not isinstance(entries, list) or not entries:
            doc[section] = draw(awkward)
            continue
        i = draw(st.integers(0, len(entries) - 1))
        entry = entries[i]
        op = draw(st.sampled_from(["replace", "replace", "bbox_item", "delete", "duplicate", "entry"]))
        if op == "entry" or not isinstance(entry, dict) or not entry:
            entries[i] = draw(awkward)
        elif op == "duplicate":
            entries.append(dict(entry))
        elif op == "bbox_item" and isinstance(entry.get("bbox"), list) and entry["bbox"]:
            entry["bbox"][draw(st.integers(0, len(entry["bbox"]) - 1))] = draw(awkward)
        else:
            key = draw(st.sampled_from(sorted(entry)))
            if op == "delete":
                del entry[key]
            else:
                entry[key] = draw(awkward)
    return doc


@pytest.fixture(scope="module")
def scratch() -> Any:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@fuzz(400)
@given(doc=st.one_of(coco_documents(), mutated_documents()), garble=st.integers(0, 30))
def test_annotation_reader_raises_only_dataset_errors(scratch, doc, garble):
    text = json.dumps(doc)
    if garble == 0:  # also broken JSON: cut it somewhere
        text = text[: len(text) // 2]
    ann = scratch / "ann.json"
    ann.write_text(text)
    try:
        COCODetection(ann, scratch, remove_images_without_annotations=False)
        refused, message = False, ""
    except DatasetError as exc:
        refused, message = True, str(exc)
    try:
        load_ground_truth(ann)
        assert not refused, f"reader refused ({message}) but eval accepted: {text}"
    except DatasetError as exc:
        assert str(exc) == message, f"reader said {message!r}, eval {exc}: {text}"
    report = check_dataset(ann, None)
    assert isinstance(report, CheckReport)
    codes = {p.code for p in report.fatal}
    if refused:
        assert codes, f"reader refused but check found nothing fatal: {text}"
    else:
        assert codes <= {"no_trainable_images"}, f"reader accepted but check says {codes}: {text}"
    report.format()
    json.dumps(report.to_dict())


def _encoded(ext: str) -> bytes:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 17, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


VALID = {"png": _encoded(".png"), "jpg": _encoded(".jpg")}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["png", "jpg", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=256))
    data = bytearray(VALID[kind])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
    return bytes(data)


@fuzz(600)
@given(data=mutated_images())
def test_decode_image_raises_only_image_read_errors(data):
    # a small pixel limit: a mutated header must not make a test allocate gigabytes
    try:
        image = decode_image(data, source="fuzz.bin", max_pixels=1_000_000)
    except ImageReadError as exc:
        assert str(exc).startswith("fuzz.bin: ")
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= 1_000_000
