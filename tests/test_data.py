"""COCO-format reading (against pycocotools on real COCO images), layouts, images, bad input, the doctor."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require
from PIL import Image

from detrax import cli
from detrax.data.coco import DataError, load_image, read_coco, splits
from detrax.data.synthetic import write_dataset

COCO_TINY = Path(__file__).resolve().parent / "data" / "coco-tiny"  # 16 real COCO images (tests/data/README.md)


@pytest.fixture(scope="module")
def coco_tiny():
    if not (COCO_TINY / "annotations" / "instances_train2017.json").is_file():
        pytest.fail(f"the test data is missing: expected {COCO_TINY} (part of the repository)", pytrace=False)
    return str(COCO_TINY)


@pytest.fixture
def synth(tmp_path):
    write_dataset(str(tmp_path / "ds"), num_images=8, seed=1)
    return tmp_path / "ds"


def test_reads_real_coco_exactly_as_pycocotools(coco_tiny):
    coco_mod = require("pycocotools.coco")
    ref = coco_mod.COCO(os.path.join(coco_tiny, "annotations", "instances_train2017.json"))
    ds = read_coco(coco_tiny, "train2017")
    assert len(ds.records) == 16 and ds.num_classes == 91 and ds.problems == []
    assert ds.names == {c["id"]: c["name"] for c in ref.loadCats(ref.getCatIds())}
    assert ds.counts["crowd"] == 1
    total = 0
    for r in ds.records:
        info = ref.loadImgs(r["image_id"])[0]
        assert (r["width"], r["height"]) == (info["width"], info["height"])
        want_boxes, want_labels = [], []
        for a in ref.loadAnns(ref.getAnnIds(imgIds=r["image_id"])):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            x0, y0 = np.clip([x, y], 0, [info["width"], info["height"]])
            x1, y1 = np.clip([x + w, y + h], 0, [info["width"], info["height"]])
            if x1 > x0 and y1 > y0:
                want_boxes.append([x0, y0, x1, y1])
                want_labels.append(a["category_id"])
        np.testing.assert_allclose(r["boxes"], np.array(want_boxes, np.float32).reshape(-1, 4), rtol=1e-6)
        np.testing.assert_array_equal(r["labels"], want_labels)
        image = load_image(r)
        assert image.mode == "RGB" and image.size == (info["width"], info["height"])
        total += len(want_labels)
    assert total == 196


def test_roboflow_layout_is_detected(synth, tmp_path):
    rf = tmp_path / "rf"
    shutil.copytree(synth / "train", rf / "train")
    shutil.copy(synth / "annotations" / "instances_train.json", rf / "train" / "_annotations.coco.json")
    assert splits(str(rf)) == ["train"] and splits(str(synth)) == ["train", "val"]
    a, b = read_coco(str(synth), "train"), read_coco(str(rf), "train")
    assert b.annotation_file.endswith("_annotations.coco.json")
    assert [r["image_id"] for r in a.records] == [r["image_id"] for r in b.records]
    for x, y in zip(a.records, b.records):
        np.testing.assert_array_equal(x["boxes"], y["boxes"])
    with pytest.raises(DataError, match="no split 'test'.*splits found: train"):
        read_coco(str(rf), "test")


def _one_image_dataset(root, image: Image.Image, width=None, height=None, anns=None, save_kw=None, name="a.jpg"):
    os.makedirs(root / "annotations", exist_ok=True)
    os.makedirs(root / "train", exist_ok=True)
    image.save(root / "train" / name, **(save_kw or {}))
    w, h = width or image.width, height or image.height
    data = {"images": [{"id": 7, "file_name": name, "width": w, "height": h}],
            "annotations": anns if anns is not None else [{"id": 1, "image_id": 7, "category_id": 1,
                                                           "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return read_coco(str(root), "train")


def test_exif_orientation_follows_the_annotations(tmp_path):
    raw = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = raw.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    oriented = _one_image_dataset(tmp_path / "o", raw, 20, 40, save_kw={"exif": exif})
    assert load_image(oriented.records[0]).size == (20, 40)  # annotated on the displayed image
    stored = _one_image_dataset(tmp_path / "s", raw, 40, 20, save_kw={"exif": exif})
    assert load_image(stored.records[0]).size == (40, 20)  # annotated on the stored pixels
    wrong = _one_image_dataset(tmp_path / "w", raw, 30, 30, save_kw={"exif": exif})
    with pytest.raises(DataError, match=r"a\.jpg: image 7 is 40x20 but the annotations say 30x30"):
        load_image(wrong.records[0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_every_mode_becomes_rgb(tmp_path, mode):
    image = Image.new("RGB", (12, 10), (10, 200, 30)).convert(mode)
    name = "a.tif" if mode in ("CMYK", "I;16") else "a.png"
    ds = _one_image_dataset(tmp_path, image, name=name)
    out = load_image(ds.records[0])
    assert out.mode == "RGB" and out.size == (12, 10)


def _bad_json(tmp_path, data):
    os.makedirs(tmp_path / "annotations", exist_ok=True)
    os.makedirs(tmp_path / "train", exist_ok=True)
    Image.new("RGB", (50, 40)).save(tmp_path / "train" / "a.png")
    (tmp_path / "annotations" / "instances_train.json").write_text(data if isinstance(data, str) else json.dumps(data))
    return str(tmp_path)


GOOD_IMAGE = {"id": 3, "file_name": "a.png", "width": 50, "height": 40}
CATS = [{"id": 2, "name": "thing"}]


@pytest.mark.parametrize("data,message", [
    ("{not json", r"instances_train\.json: not readable JSON"),
    ({"images": [], "categories": []}, r"instances_train\.json: not a COCO file \('annotations' missing"),
    ({"images": {}, "annotations": [], "categories": []}, r"'images' missing or not a list"),
    ({"images": [GOOD_IMAGE], "annotations": [], "categories": [{"id": "x", "name": 1}]}, r"category .* integer id"),
    ({"images": [{"id": 3, "file_name": "a.png", "width": "50", "height": 40}], "annotations": [],
      "categories": CATS}, r"image entry .* positive width and height"),
    ({"images": [GOOD_IMAGE], "annotations": [{"id": 9, "image_id": 3, "category_id": 2, "bbox": [1, 1, -4, 5]}],
      "categories": CATS}, r"annotation 9 \(image 3\): bbox \[1, 1, -4, 5\] has negative size"),
    ({"images": [GOOD_IMAGE], "annotations": [{"id": 9, "image_id": 3, "category_id": 2, "bbox": [60, 1, 4, 5]}],
      "categories": CATS}, r"annotation 9 \(image 3\): bbox \[60, 1, 4, 5\] lies outside the 50x40 image"),
    ({"images": [GOOD_IMAGE], "annotations": [{"id": 9, "image_id": 4, "category_id": 2, "bbox": [1, 1, 4, 5]}],
      "categories": CATS}, r"annotation 9: unknown image id 4"),
    ({"images": [GOOD_IMAGE], "annotations": [{"id": 9, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, 5]}],
      "categories": CATS}, r"annotation 9 \(image 3\): unknown category id 5"),
    ({"images": [GOOD_IMAGE], "annotations": [{"id": 9, "image_id": 3, "category_id": 2, "bbox": [1, "a", 4, 5]}],
      "categories": CATS}, r"annotation 9 \(image 3\): bbox .* is not 4 finite numbers"),
    ({"images": [dict(GOOD_IMAGE, file_name="gone.png")], "annotations": [], "categories": CATS},
     r"gone\.png: image 3: file .*gone\.png is missing"),
])
def test_bad_json_is_named(tmp_path, data, message):
    root = _bad_json(tmp_path, data)
    with pytest.raises(DataError, match=message):
        read_coco(root, "train")


def test_skip_bad_counts_and_keeps_the_rest(tmp_path):
    data = {"images": [GOOD_IMAGE, dict(GOOD_IMAGE, id=4, file_name="gone.png")], "categories": CATS,
            "annotations": [{"id": 1, "image_id": 3, "category_id": 2, "bbox": [1, 1, 4, 5]},
                            {"id": 2, "image_id": 3, "category_id": 2, "bbox": [1, 1, -4, 5]},
                            {"id": 3, "image_id": 3, "category_id": 99, "bbox": [1, 1, 4, 5]},
                            {"id": 4, "image_id": 3, "category_id": 2, "bbox": [45, 35, 10, 10]},  # clipped
                            {"id": 5, "image_id": 3, "category_id": 2, "bbox": [10, 10, 0, 5]},  # degenerate
                            {"id": 6, "image_id": 3, "category_id": 2, "bbox": [1, 1, 4, 5], "iscrowd": 1}]}
    ds = read_coco(_bad_json(tmp_path, data), "train", skip_bad=True)
    assert len(ds.records) == 1 and sorted(p["id"] for p in ds.problems) == [2, 3, 4]
    np.testing.assert_allclose(ds.records[0]["boxes"], [[1, 1, 5, 6], [45, 35, 50, 40]])
    assert ds.counts == {"crowd": 1, "degenerate": 1, "annotations": 2}


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"plain text, not an image"])
def test_unreadable_images_are_named(tmp_path, content):
    ds = _one_image_dataset(tmp_path, Image.new("RGB", (8, 8)), name="b.png")
    (tmp_path / "train" / "b.png").write_bytes(content)
    with pytest.raises(DataError, match=r"b\.png: image 7 is not a readable image"):
        load_image(ds.records[0])


def test_truncated_jpeg_is_named(tmp_path):
    ds = _one_image_dataset(tmp_path, Image.new("RGB", (64, 64), (5, 5, 5)), name="c.jpg")
    path = tmp_path / "train" / "c.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"c\.jpg: image 7 is not a readable image"):
        load_image(ds.records[0])


def test_data_cli_synth_and_check(tmp_path, capsys):
    assert cli.main(["data", "synth", str(tmp_path / "s"), "--num-images", "6", "--seed", "3"]) == 0
    capsys.readouterr()
    assert cli.main(["data", "check", str(tmp_path / "s")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["splits"]["train"]["images"] + report["splits"]["val"]["images"] == 6
    assert report["splits"]["train"]["categories"] == 3
    (tmp_path / "s" / "val" / os.listdir(tmp_path / "s" / "val")[0]).write_bytes(b"broken")
    assert cli.main(["data", "check", str(tmp_path / "s")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and "not a readable image" in report["splits"]["val"]["problems"][0]["error"]
    assert cli.main(["data", "check", str(tmp_path / "nothing")]) == 2


def test_data_cli_synth_size_fixes_every_image(tmp_path, capsys):
    """`--size HxW`: every image that size (the demo's: one batch shape, one compilation)."""
    assert cli.main(["data", "synth", str(tmp_path / "s"), "--num-images", "5", "--size", "40x56"]) == 0
    for split in ("train", "val"):
        images = json.load(open(tmp_path / "s" / "annotations" / f"instances_{split}.json"))["images"]
        assert images and {(i["height"], i["width"]) for i in images} == {(40, 56)}
        assert {Image.open(tmp_path / "s" / split / i["file_name"]).size for i in images} == {(56, 40)}
    capsys.readouterr()
    assert cli.main(["data", "synth", str(tmp_path / "t"), "--size", "40x"]) == 2
    assert "--size '40x': expected HxW" in capsys.readouterr().err and not (tmp_path / "t").exists()


def test_synthetic_dataset_is_deterministic(tmp_path):
    write_dataset(str(tmp_path / "a"), 6, seed=4)
    write_dataset(str(tmp_path / "b"), 6, seed=4)
    for split in ("train", "val"):
        ja = (tmp_path / "a" / "annotations" / f"instances_{split}.json").read_text()
        assert ja == (tmp_path / "b" / "annotations" / f"instances_{split}.json").read_text()
    a = np.asarray(Image.open(tmp_path / "a" / "train" / "000001.png"))
    np.testing.assert_array_equal(a, np.asarray(Image.open(tmp_path / "b" / "train" / "000001.png")))


def test_the_varied_synthetic_set_has_sparse_ids_crowds_and_empty_images(tmp_path):
    from detrax.data.synthetic import write_varied_dataset

    assert write_varied_dataset(str(tmp_path / "v"), 80, seed=3) == {"train": 60, "val": 20}
    ds = read_coco(str(tmp_path / "v"), "train")
    assert ds.names == {7: "diamond", 15: "cross", 23: "ring"} and ds.num_classes == 24 and ds.problems == []
    assert ds.counts["crowd"] > 0  # crowd regions are left out of the targets, as the official rules
    assert {len(r["labels"]) for r in ds.records} >= {0, 1}  # empty images are kept
    assert {h for r in ds.records for h in (r["height"], r["width"])} <= set(range(112, 209))
    for r in ds.records:
        assert set(r["labels"].tolist()) <= {7, 15, 23}
        assert ((r["boxes"][:, 2:] > r["boxes"][:, :2]).all() and (r["boxes"][:, 2] <= r["width"]).all()
                and (r["boxes"][:, 3] <= r["height"]).all())
    write_varied_dataset(str(tmp_path / "w"), 80, seed=3)
    assert ((tmp_path / "v" / "annotations" / "instances_val.json").read_text()
            == (tmp_path / "w" / "annotations" / "instances_val.json").read_text())
