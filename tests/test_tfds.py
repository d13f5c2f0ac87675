"""The TFDS `coco/2017` source gives the same examples as the COCO-format folder (TFDS itself is replaced by
`tfds_fake.FakeCocoSource`, which builds examples as TFDS's COCO builder does; preparing the real dataset needs
the download and tensorflow)."""

import json
import sys
import types

import numpy as np
import pytest
from conftest import PLAIN, require
from test_data import coco_tiny  # noqa: F401  (fixture)
from tfds_fake import FakeCocoSource

from detrax.config import presets, schema
from detrax.config.overrides import override
from detrax.data import tfds_coco
from detrax.data.coco import DataError, load_image, read_coco
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.sources import ground_truth, list_splits, read_split
from detrax.data.synthetic import write_dataset
from detrax.evaluation.coco import coco_ap
from detrax.training.loop import Run, fit


@pytest.fixture
def fake_tfds(monkeypatch, coco_tiny):  # noqa: F811
    def open_(name, split, data_dir):
        assert name == "coco/2017" and data_dir == "/data/tfds"
        return FakeCocoSource(coco_tiny, {"train": "train2017"}[split])
    monkeypatch.setattr(tfds_coco, "_open", open_)
    return "tfds:coco/2017@/data/tfds"


def test_category_table_is_coco_2017(coco_tiny):  # noqa: F811
    cats = json.load(open(f"{coco_tiny}/annotations/instances_train2017.json"))["categories"]
    assert tfds_coco.COCO_2017_IDS == tuple(c["id"] for c in cats)


def test_same_records_and_pixels_as_the_folder(fake_tfds, coco_tiny):  # noqa: F811
    folder = read_coco(coco_tiny, "train2017")
    ds = read_split(fake_tfds, "train")
    assert ds.names == folder.names and ds.num_classes == 91 and len(ds.records) == len(folder.records) == 16
    by_id = {r["image_id"]: r for r in folder.records}
    for r in ds.records:
        want = by_id[r["image_id"]]
        assert (r["width"], r["height"]) == (want["width"], want["height"])
        np.testing.assert_array_equal(r["labels"], want["labels"])
        np.testing.assert_allclose(r["boxes"], want["boxes"], atol=2e-4 * max(r["width"], r["height"]))
        np.testing.assert_array_equal(np.asarray(load_image(r)), np.asarray(load_image(want)))
    assert len(ds.records[2:5]) == 3 and ds.records[-1]["image_id"] == ds.records[15]["image_id"]


def test_same_batches_as_the_folder(fake_tfds, coco_tiny):  # noqa: F811
    folder, ds = read_coco(coco_tiny, "train2017"), read_split(fake_tfds, "train")
    order = {r["image_id"]: i for i, r in enumerate(folder.records)}
    records = sorted(ds.records, key=lambda r: order[r["image_id"]])
    aug = Augment(True, schema.DataConfig(scales=(96, 128), max_size=160, crop_scales=(80,), crop_size=(64, 96)))
    batches = [list(Loader(dataset(recs, aug, 4, max_targets=32, step=32, seed=5, epochs=1)))
               for recs in (folder.records, records)]
    for a, b in zip(*batches, strict=True):
        np.testing.assert_array_equal(a["pixels"], b["pixels"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)


def test_ground_truth_gives_the_same_ap(fake_tfds, coco_tiny):  # noqa: F811
    require("pycocotools.coco")
    ann = f"{coco_tiny}/annotations/instances_train2017.json"
    gt_file = json.load(open(ann))
    rng = np.random.default_rng(0)
    results = []
    for a in gt_file["annotations"]:  # detections near the truth, some wrong, scores random
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
        cat = a["category_id"] if rng.random() < 0.8 else 1
        results.append({"image_id": a["image_id"], "category_id": cat, "score": float(rng.random()),
                        "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]})
    ds = read_split(fake_tfds, "train")
    gt = ground_truth(ds)
    assert ds.counts == {"crowd": 1, "degenerate": 0, "annotations": 196}
    ds.records.source.examples.clear()  # a second evaluation reads no example again
    assert ground_truth(ds) is gt
    ids = [im["id"] for im in gt["images"]]
    want, got = coco_ap(ann, results, ids), coco_ap(gt, results, ids)
    assert want["AP"] > 0.1
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def test_train_and_eval_on_tfds(monkeypatch, tmp_path):
    root = tmp_path / "synth"
    write_dataset(str(root), num_images=10, seed=2, shape=presets.DEMO_SHAPE)  # categories 1..3: COCO's first three

    class Source(FakeCocoSource):
        def __init__(self, root, split):
            super().__init__(root, split)
            self.dataset_info.features["objects"]["label"].names = [f"c{i}" for i in tfds_coco.COCO_2017_IDS]

    monkeypatch.setattr(tfds_coco, "_open", lambda name, split, d: Source(str(root), {"validation": "val"}.get(split,
                                                                                                            split)))
    assert list_splits("tfds:coco/2017") == ["train", "validation"]
    # the demo's batches of 8 and COCO's 91 classes: test_train's class-count run compiles the same step
    cfg = override(presets.get("demo"), [*PLAIN, "train.steps=3", "model.num_classes=91", "train.eval_every=1",
                                         "data.workers=0"])
    summary = fit(cfg, Run("tfds:coco/2017", str(tmp_path / "run"), quiet=True))
    assert summary["step"] == 3 and set(summary["eval"]) >= {"AP", "AP50"}


def test_missing_package_and_unprepared_dataset(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'detrax\[tfds\]'"):
        read_split("tfds:coco/2017", "train")

    def data_source(name, split, data_dir, decoders):
        raise FileNotFoundError(f"{data_dir}/{name}: no dataset_info.json")

    fake = types.SimpleNamespace(data_source=data_source, decode=types.SimpleNamespace(SkipDecoding=object))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    with pytest.raises(DataError, match=r"tfds:coco/2017: split 'validation' cannot be read from data dir /d: .*"
                                        r"no dataset_info.json. Prepare it first, e.g. tfds build coco/2017"):
        read_split("tfds:coco/2017@/d", "validation")


def test_bad_example_names_the_image(fake_tfds):
    ds = read_split(fake_tfds, "train")
    ds.records.source.examples[3]["image"] = b"not a jpeg"
    ds.records.source.examples[4]["objects"]["label"][:] = 80
    with pytest.raises(DataError, match=r"tfds:coco/2017@/data/tfds/train: image \d+ is not a readable image"):
        ds.records[3]
    with pytest.raises(DataError, match=r"image \d+ has a label outside the 80 categories"):
        ds.records[4]


def test_data_check_reads_tfds_as_the_folder(fake_tfds, coco_tiny, capsys):  # noqa: F811
    """`detrax data check` works for every source: on TFDS it reports what it reports on the same folder."""
    from detrax import cli

    assert cli.main(["data", "check", fake_tfds, "--split", "train"]) == 0
    tfds_report = json.loads(capsys.readouterr().out)["splits"]["train"]
    assert cli.main(["data", "check", coco_tiny, "--split", "train2017"]) == 0
    folder_report = json.loads(capsys.readouterr().out)["splits"]["train2017"]
    assert tfds_report == folder_report and tfds_report["images"] == 16 and tfds_report["crowd"] == 1
