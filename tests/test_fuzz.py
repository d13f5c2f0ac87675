"""The COCO reader and the image decoder under fuzzed input (hypothesis, bounded in examples and time):
malformed JSON, wrong types, huge or zero-sized images, broken files. Nothing escapes but `DataError` (the
documented error, naming the file) or counted skips; whatever is read is well-formed."""

import io
import json
import os
import shutil
import tempfile

import numpy as np
from conftest import require
from PIL import Image

from detrax.data.coco import DataError, load_image, read_coco

hypothesis = require("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=8))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                        max_leaves=12)


def _maybe(strategy):
    """Mostly `strategy`, now and then anything at all."""
    return st.one_of(strategy, strategy, strategy, strategy, strategy, strategy, anything)


number = st.one_of(st.integers(-50, 300), st.floats(-50, 300), st.sampled_from([float("nan"), float("inf"), -1e300]))
image_entry = st.fixed_dictionaries({"id": _maybe(st.integers(0, 4)), "file_name": _maybe(st.sampled_from(
    ["a.png", "a.png", "a.png", "b.png", "missing.png", "../x.png", ""])),
    "width": _maybe(st.sampled_from([80, 80, 80, 0, -1, 79, 10**9])),
    "height": _maybe(st.sampled_from([60, 60, 60, 0, -1, 61]))})
annotation = st.fixed_dictionaries({"id": _maybe(st.integers(0, 50)), "image_id": _maybe(st.integers(0, 4)),
                                    "category_id": _maybe(st.integers(0, 3)),
                                    "bbox": _maybe(st.lists(number, min_size=3, max_size=5)),
                                    "iscrowd": _maybe(st.sampled_from([0, 1]))})
category = st.fixed_dictionaries({"id": _maybe(st.integers(-1, 3)), "name": _maybe(st.text(max_size=5))})
categories = st.lists(category, max_size=3, unique_by=lambda d: repr(d["id"]))
coco = st.fixed_dictionaries({"images": _maybe(st.lists(image_entry, max_size=4, unique_by=lambda d: repr(d["id"]))),
                              "annotations": _maybe(st.lists(annotation, max_size=8)),
                              "categories": _maybe(categories)})


def _folder(document) -> str:
    root = tempfile.mkdtemp()
    os.makedirs(os.path.join(root, "annotations"))
    os.makedirs(os.path.join(root, "train"))
    Image.new("RGB", (80, 60), (90, 20, 20)).save(os.path.join(root, "train", "a.png"))
    with open(os.path.join(root, "train", "b.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    text = document if isinstance(document, str) else json.dumps(document)
    with open(os.path.join(root, "annotations", "instances_train.json"), "w") as f:
        f.write(text)
    return root


def _check(ds):
    for r in ds.records:
        assert r["width"] > 0 and r["height"] > 0
        b = r["boxes"]
        assert b.dtype == np.float32 and b.shape == (len(r["labels"]), 4) and np.isfinite(b).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b[:, [0, 2]] <= r["width"]).all() and (b[:, [1, 3]] <= r["height"]).all()
        assert set(r["labels"].tolist()) <= set(ds.names)
        try:
            image = load_image(r)
        except DataError as e:
            assert r["file"] in str(e)
        else:
            assert image.mode == "RGB" and image.size == (r["width"], r["height"])


@FUZZ
@given(st.one_of(coco, coco, coco, coco, coco, coco, anything, st.text(max_size=40)))
def test_reader_on_fuzzed_json(document):
    root = _folder(document)
    try:
        for skip_bad in (False, True):
            try:
                ds = read_coco(root, "train", skip_bad=skip_bad)
            except DataError as e:
                assert "instances_train.json" in str(e) or "train" in str(e)
                continue
            _check(ds)
            assert all({"file", "id", "error"} <= set(p) for p in ds.problems)
            if not skip_bad:
                assert ds.problems == []
    finally:
        shutil.rmtree(root)


@FUZZ
@given(st.lists(annotation, max_size=10))
def test_reader_on_fuzzed_annotations_of_a_valid_file(annotations):
    """Valid images and categories, fuzzed annotations: the box rules (clip, degenerate, outside, negative)."""
    document = {"images": [{"id": 1, "file_name": "a.png", "width": 80, "height": 60},
                           {"id": 2, "file_name": "a.png", "width": 80, "height": 60}],
                "annotations": annotations, "categories": [{"id": i, "name": f"c{i}"} for i in range(4)]}
    root = _folder(document)
    try:
        ds = read_coco(root, "train", skip_bad=True)
        _check(ds)
        kept = sum(len(r["labels"]) for r in ds.records)
        assert kept + len(ds.problems) + ds.counts["crowd"] + ds.counts["degenerate"] == len(annotations)
    finally:
        shutil.rmtree(root)


def _png(w, h) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


@FUZZ
@given(st.one_of(
    st.binary(max_size=300),  # random bytes
    st.builds(lambda data, cut: data[:cut], st.just(_png(30, 20)), st.integers(0, 200)),  # truncated PNG
    st.builds(lambda data, i, v: data[:i] + bytes([v]) + data[i + 1:], st.just(_png(30, 20)),
              st.integers(0, 150), st.integers(0, 255)),  # one corrupted byte
))
def test_decoder_on_fuzzed_bytes(data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.png")
        with open(path, "wb") as f:
            f.write(data)
        try:
            image = load_image({"file": path, "image_id": 1, "width": 30, "height": 20})
        except DataError as e:
            assert path in str(e) and "image 1" in str(e)
        else:
            assert image.mode == "RGB" and image.size == (30, 20)


def test_huge_and_zero_sized_images(tmp_path):
    """A PNG header claiming 60000 x 60000 pixels (a decompression bomb) and one of zero width."""
    import struct
    import zlib

    def png(w, h):
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body))
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(
            b"IEND", b"")

    for w, h in ((60000, 60000), (0, 10)):
        path = tmp_path / f"{w}x{h}.png"
        path.write_bytes(png(w, h))
        try:
            load_image({"file": str(path), "image_id": 5, "width": max(w, 1), "height": h})
        except DataError as e:
            assert str(path) in str(e) and "image 5" in str(e)
        else:
            raise AssertionError(f"{w}x{h}: no error")
