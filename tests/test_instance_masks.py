"""Instance masks from COCO polygons and RLE (data.task=segm), and mask AP in the evaluation."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from detrax.config import schema
from detrax.data.coco import DataError, read_coco, record_masks
from detrax.data.loader import Augment
from detrax.data.sources import read_split
from detrax.data.synthetic import write_dataset

COCO_TINY = Path(__file__).resolve().parent / "data" / "coco-tiny"


def test_real_coco_polygons_decode_as_pycocotools():
    coco = require("pycocotools.coco").COCO(str(COCO_TINY / "annotations" / "instances_train2017.json"))
    ds = read_split(str(COCO_TINY), "train2017", task="segm")
    assert ds.task == "segm" and len(ds.records) == 16
    checked = 0
    for r in ds.records:
        masks = record_masks(r)
        assert masks.shape == (len(r["labels"]), r["height"], r["width"])
        for m, aid in zip(masks, r["ann_ids"]):
            np.testing.assert_array_equal(m, coco.annToMask(coco.anns[aid]).astype(bool))
            checked += 1
    assert checked > 50
    x, t = Augment(False, schema.DataConfig(val_size=200, max_size=300, task="segm"))(ds.records[0])
    assert t["masks"].shape == (len(t["labels"]), *x.shape[:2]) and t["masks"].any()


def test_bad_segmentations_name_the_file_and_annotation(tmp_path):
    write_dataset(str(tmp_path), num_images=4, seed=1)
    ann = tmp_path / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    first = data["annotations"][0]
    first["segmentation"] = [[1, 2, 3]]
    ann.write_text(json.dumps(data))
    r = next(r for r in read_coco(str(tmp_path), "train").records if r["image_id"] == first["image_id"])
    with pytest.raises(DataError, match=f"annotation {first['id']} .*polygons must be lists of at least 3"):
        record_masks(r)
    first["segmentation"] = {"counts": "abc", "size": [1, 1]}
    ann.write_text(json.dumps(data))
    r = next(r for r in read_coco(str(tmp_path), "train").records if r["image_id"] == first["image_id"])
    with pytest.raises(DataError, match=f"{os.path.basename(r['file'])}: annotation {first['id']} .*not polygons or "
                                        "an RLE of the image's size"):
        record_masks(r)


def test_segm_evaluation_reports_box_and_mask_ap(tmp_path):
    import detrax
    from detrax.evaluation.coco import evaluate, predict_dataset
    write_dataset(str(tmp_path), num_images=6, seed=4, shape=(64, 80))
    ds = read_split(str(tmp_path), "val", task="segm")
    detector = detrax.load("random:demo_panoptic", num_classes=4)
    data = schema.DataConfig(val_size=64, max_size=100, bucket_step=32, task="segm", max_targets=16)
    metrics = evaluate(detector.infer_masks, ds, data, batch_size=2, out_dir=str(tmp_path / "ev"))
    assert {"AP", "AP50", "mask_AP", "mask_AP50", "mask_APl"} <= set(metrics)
    assert all(0 <= v <= 1 or v == -1 for v in metrics.values())
    results = predict_dataset(detector.infer_masks, ds.records, data, 2, masks=True)
    assert len(results) == 16 * len(ds.records) and all(r["segmentation"]["size"] == [64, 80] for r in results)
    # the ground truth's own masks, RLE-encoded as the results are: mask AP 1
    from detrax.evaluation.coco import coco_ap, rle_encode

    perfect = [{"image_id": r["image_id"], "category_id": int(c), "bbox": [float(x0), float(y0), float(x1 - x0),
                                                                           float(y1 - y0)],
                "score": 1.0, "segmentation": rle}
               for r in ds.records for c, (x0, y0, x1, y1), rle in zip(r["labels"], r["boxes"],
                                                                        rle_encode(record_masks(r)))]
    gt = str(tmp_path / "annotations" / "instances_val.json")
    assert coco_ap(gt, perfect, [r["image_id"] for r in ds.records], iou_type="segm")["AP"] == pytest.approx(1.0)
