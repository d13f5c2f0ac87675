"""PQ, SQ, RQ as panopticapi counts them: hand-made cases with known answers, and random scenes against an
independent rendering of panopticapi's pq_compute (files: PNGs and JSONs)."""

import json

import numpy as np
import pytest
from panopticapi_reference import average, new_stat, single_image
from PIL import Image

from detrax.data import masks
from detrax.evaluation import pq

CATS = {1: {"id": 1, "isthing": 1, "name": "a"}, 2: {"id": 2, "isthing": 1, "name": "b"},
        3: {"id": 3, "isthing": 0, "name": "sky"}}


def _seg(i, cat, crowd=0, ids=None):
    s = {"id": i, "category_id": cat, "iscrowd": crowd}
    if ids is not None:
        s["area"] = int((ids == i).sum())
    return s


def _one(gt, gt_segs, pred, pred_segs):
    return pq.summarise(pq.image_stats(gt, gt_segs, pred, pred_segs, CATS), CATS)


def test_perfect_prediction_is_one():
    gt = np.zeros((20, 20), np.uint32)
    gt[:10], gt[10:, :5] = 5, 7
    r = _one(gt, [_seg(5, 1, ids=gt), _seg(7, 3, ids=gt)], gt * 2, [_seg(10, 1), _seg(14, 3)])
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    assert r["Things"]["n"] == 1 and r["Stuff"]["n"] == 1


def test_known_iou_void_wrong_class_and_the_half_threshold():
    gt = np.zeros((20, 20), np.uint32)
    gt[:10, :10] = 1  # 100 pixels of category 1
    pred = np.zeros_like(gt)
    pred[:10, 2:12] = 9  # 80 pixels on the segment, 20 on void (id 0), which leave the union:
    gt_segs = [_seg(1, 1, ids=gt)]  # IoU = 80 / (100 + 100 - 80 - 20) = 0.8
    r = _one(gt, gt_segs, pred, [_seg(9, 1)])
    assert r["All"]["pq"] == pytest.approx(0.8) and r["All"]["rq"] == 1.0
    gt2 = gt.copy()
    gt2[:10, 10:] = 2  # now those 20 pixels are another segment: IoU = 80 / 120
    r = _one(gt2, gt_segs + [_seg(2, 3, ids=gt2)], pred, [_seg(9, 1)])
    assert r["per_class"][1]["pq"] == pytest.approx(2 / 3) and r["per_class"][3] == {"pq": 0, "sq": 0, "rq": 0}
    r = _one(gt2, gt_segs + [_seg(2, 3, ids=gt2)], pred, [_seg(9, 2)])  # wrong category: FP (2) and FN (1)
    assert r["per_class"][1]["pq"] == 0 and r["per_class"][2]["rq"] == 0 and r["All"]["n"] == 3
    half = np.zeros_like(gt2)
    half[:10, 5:15] = 9  # 50 on segment 1, 50 on segment 2: IoU 50 / 150, no match; not void, so a FP
    r = _one(gt2, gt_segs + [_seg(2, 3, ids=gt2)], half, [_seg(9, 1)])
    assert r["per_class"][1] == {"pq": 0.0, "sq": 0.0, "rq": 0.0} and r["All"]["n"] == 2


def test_crowd_regions_swallow_predictions_of_their_own_category_only():
    gt = np.zeros((20, 20), np.uint32)
    gt[:, :10] = 3  # a crowd region of category 1
    gt[:, 10:] = 4  # a thing of category 2
    segs = [_seg(3, 1, crowd=1, ids=gt), _seg(4, 2, ids=gt)]
    pred = np.zeros_like(gt)
    pred[:, 10:] = 1
    pred[:8, :8] = 2  # on the crowd
    r = _one(gt, segs, pred, [_seg(1, 2), _seg(2, 1)])  # category 1 on a crowd of category 1: ignored
    assert r["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 1}
    r = _one(gt, segs, pred, [_seg(1, 2), _seg(2, 2)])  # category 2 on it: a false positive of category 2
    assert r["per_class"][2]["rq"] == pytest.approx(1 / 1.5)


def test_prediction_errors_name_the_image_and_segment():
    gt = np.ones((4, 4), np.uint32)
    with pytest.raises(ValueError, match="img7: segment 5 is in the prediction's PNG"):
        pq.image_stats(gt, [_seg(1, 1)], gt * 5, [], CATS, "img7")
    with pytest.raises(ValueError, match=r"segments \[6\] are in the prediction's segments_info but not"):
        pq.image_stats(gt, [_seg(1, 1)], gt, [_seg(1, 1), _seg(6, 1)], CATS, "img7")
    with pytest.raises(ValueError, match="unknown category_id 99"):
        pq.image_stats(gt, [_seg(1, 1)], gt, [_seg(1, 99)], CATS, "img7")


def _random_scene(rs, h=48, w=64):
    """Ground truth: stuff bands, things, a crowd region, void; the prediction: shifted, relabelled, split."""
    gt = np.zeros((h, w), np.uint32)
    segs, next_id = [], 1
    for top in range(0, h, 16):
        if rs.random() < 0.8:
            gt[top:top + 16] = next_id
            segs.append({"id": next_id, "category_id": 3, "iscrowd": 0})
            next_id += 1
    for _ in range(rs.integers(1, 6)):
        y, x, hh, ww = rs.integers(0, h - 8), rs.integers(0, w - 8), rs.integers(4, 20), rs.integers(4, 20)
        gt[y:y + hh, x:x + ww] = next_id
        segs.append({"id": next_id, "category_id": int(rs.integers(1, 3)), "iscrowd": int(rs.random() < 0.2)})
        next_id += 1
    gt[rs.random((h, w)) < 0.05] = 0  # void specks
    present = set(np.unique(gt).tolist())
    segs = [dict(s, area=int((gt == s["id"]).sum())) for s in segs if s["id"] in present]
    pred = np.roll(gt, (int(rs.integers(-3, 4)), int(rs.integers(-3, 4))), (0, 1)).astype(np.uint32) * 3
    pred[rs.random((h, w)) < 0.1] = 0
    if rs.random() < 0.5:
        pred[rs.integers(0, h):, : rs.integers(1, w)] = 999  # a spurious segment
    pred_segs = []
    for i in sorted(set(np.unique(pred).tolist()) - {0}):
        cat = next((s["category_id"] for s in segs if s["id"] * 3 == i), 3)
        if rs.random() < 0.15:
            cat = int(rs.integers(1, 4))
        pred_segs.append({"id": i, "category_id": cat})
    return gt, segs, pred, pred_segs


def test_random_scenes_equal_panopticapi_through_files(tmp_path):
    rs = np.random.default_rng(0)
    gt_json = {"categories": list(CATS.values()), "annotations": []}
    pred_json = {"annotations": []}
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    ref = new_stat()
    for k in range(40):
        gt, segs, pred, pred_segs = _random_scene(rs)
        Image.fromarray(masks.id2rgb(gt)).save(tmp_path / "gt" / f"{k}.png")
        Image.fromarray(masks.id2rgb(pred)).save(tmp_path / "pred" / f"{k}.png")
        gt_json["annotations"].append({"image_id": k, "file_name": f"{k}.png", "segments_info": segs})
        pred_json["annotations"].append({"image_id": k, "file_name": f"{k}.png", "segments_info": pred_segs})
        single_image(gt, segs, pred, pred_segs, CATS, ref)
    (tmp_path / "gt.json").write_text(json.dumps(gt_json))
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    got = pq.pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"),
                        str(tmp_path / "pred"))
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        want = average(ref, CATS, isthing)
        assert got[name]["n"] == want["n"] > 0
        for k in ("pq", "sq", "rq"):
            assert abs(got[name][k] - want[k]) < 1e-12, (name, k)
    assert 0.2 < got["All"]["pq"] < 0.95  # a non-trivial mix of matches and misses
    pred_json["annotations"].pop()
    (tmp_path / "pred.json").write_text(json.dumps(pred_json))
    with pytest.raises(ValueError, match="no prediction for image 39"):
        pq.pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"), str(tmp_path / "gt"),
                      str(tmp_path / "pred"))


def test_rgb_ids_round_trip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 2**24 - 1, 12345678]], np.uint32)
    np.testing.assert_array_equal(masks.rgb2id(masks.id2rgb(ids)), ids)
    assert masks.id2rgb(np.array([[256 + 2]]))[0, 0].tolist() == [2, 1, 0]
