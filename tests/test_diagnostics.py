"""`detrax eval`'s diagnostics (detrax.evaluation.analysis, confusion, diagnostics) on hand-made cases whose
answers are known: per-class AP equal to pycocotools' COCOeval restricted to that class, the F1-best threshold,
the confusion matrix with missed and spurious boxes, the kinds of error; the files written; thresholds read back
by `select`."""

import contextlib
import io
import json

import numpy as np
import pytest

from detrax.evaluation import analysis, confusion
from detrax.evaluation.coco import cocoeval
from detrax.evaluation.diagnostics import FILES, auto_thresholds, diagnose, table
from detrax.serving.postprocess import select


def _gt():
    """Two 100x100 images; cat 1 "cat": three objects, cat 2 "dog": two, one crowd region of cat 2."""
    ann = lambda i, img, cat, box, crowd=0: {"id": i, "image_id": img, "category_id": cat, "bbox": box,
                                             "area": box[2] * box[3], "iscrowd": crowd}
    return {"images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [ann(1, 1, 1, [0, 0, 20, 20]), ann(2, 1, 1, [50, 50, 20, 20]), ann(3, 2, 1, [0, 0, 30, 30]),
                            ann(4, 1, 2, [30, 0, 20, 20]), ann(5, 2, 2, [60, 60, 30, 30]),
                            ann(6, 2, 2, [0, 60, 30, 30], crowd=1)]}


def _results():
    det = lambda img, cat, box, score: {"image_id": img, "category_id": cat, "bbox": box, "score": score}
    return [det(1, 1, [0, 0, 20, 20], 0.9),  # cat true
            det(1, 1, [80, 0, 10, 10], 0.8),  # cat on background
            det(2, 1, [1, 1, 30, 30], 0.6),  # cat true
            det(1, 1, [1, 0, 20, 20], 0.3),  # a duplicate of the first: below the F1 threshold
            det(1, 2, [50, 50, 20, 20], 0.7),  # dog on the second cat: classification
            det(2, 2, [60, 60, 30, 12], 0.55),  # dog misplaced (IoU 0.4)
            det(2, 2, [0, 60, 30, 30], 0.95)]  # on the crowd region: neither true nor false


def test_per_class_numbers_are_cocoevals_own():
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, results = _gt(), _results()
    rows = analysis.per_class(cocoeval(gt, results))
    assert [(r["id"], r["name"], r["gt"]) for r in rows] == [(1, "cat", 3), (2, "dog", 2)]  # crowd not counted
    for r in rows:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = _gt()
            coco.createIndex()
            one = COCOeval(coco, coco.loadRes(results), "bbox")
            one.params.catIds = [r["id"]]
            one.evaluate()
            one.accumulate()
            one.summarize()
        assert (r["AP"], r["AP50"], r["AR"]) == pytest.approx((one.stats[0], one.stats[1], one.stats[8]), abs=1e-12)
    assert rows[0]["AP50"] > 0.5 and rows[1]["AP50"] == 0.0  # the dog detections are all wrong
    assert "cat" in table(rows) and "dog" in table(rows)


def test_the_f1_best_threshold_per_class_and_overall():
    cuts = analysis.thresholds(cocoeval(_gt(), _results()))
    # cat, best first: 0.9 true, 0.8 false, 0.6 true, 0.3 false (a duplicate); 3 objects. Cut after 0.6:
    # precision 2/3, recall 2/3, F1 2/3 (after 0.9: 1 and 1/3 -> 0.5; after 0.3: 1/2 and 2/3 -> 0.57)
    cat = cuts["per_class"][1]
    assert cat["threshold"] == pytest.approx((0.6 + 0.3) / 2)
    assert (cat["precision"], cat["recall"], cat["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert cuts["per_class"][2]["f1"] == 0.0 and cuts["per_class"][2]["threshold"] is None  # nothing true
    # all classes: 0.9 T, 0.8 F, 0.7 F, 0.6 T, 0.55 F, 0.3 F (0.95 on the crowd: ignored); 5 objects. After 0.6:
    # precision 1/2, recall 2/5, F1 4/9 (after 0.9: 1/3; after 0.55: 2/5)
    assert cuts["overall"]["threshold"] == pytest.approx((0.6 + 0.55) / 2)
    assert cuts["overall"]["f1"] == pytest.approx(4 / 9)


def test_confusion_matrix_and_error_kinds_at_a_threshold():
    gt, results = _gt(), _results()
    m = confusion.confusion(gt, results, 0.5)
    assert m["classes"] == ["cat", "dog"]
    # rows cat, dog, background; columns cat, dog, missed
    assert m["matrix"] == [[2, 1, 0],  # cats: two found, one taken for a dog
                           [0, 0, 2],  # dogs: both missed (one detection misplaced)
                           [1, 1, 0]]  # spurious: a cat on background, the misplaced dog
    errors = confusion.error_kinds(gt, results, 0.5)
    assert errors == {"score": 0.5, "true": 2, "classification": 1, "localisation": 1, "duplicate": 0,
                      "background": 1, "missed": 2}
    assert confusion.error_kinds(gt, results, 0.2)["duplicate"] == 1


def test_diagnostics_written_and_thresholds_read_back(tmp_path):
    gt, results = _gt(), _results()
    found = diagnose(cocoeval(gt, results), gt, results, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert json.loads((tmp_path / "per_class.json").read_text()) == found["per_class"]
    assert found["confusion"]["score"] == pytest.approx(0.575)  # at the overall F1 threshold
    cuts = auto_thresholds(str(tmp_path / "thresholds.json"))
    assert cuts == pytest.approx({1: 0.45, 2: 0.575})  # dog, without a threshold of its own: the overall one
    kept = select(np.array([[0.5, 0.5, 0.9]]), np.array([[1, 2, 2]]), np.zeros((1, 3, 4)), cuts)[0]
    assert kept["queries"].tolist() == [2, 0]  # the cat at 0.5 (over 0.45), the dog at 0.9; not the dog at 0.5
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError, match="bad.json is not a thresholds file"):
        auto_thresholds(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="none.json is missing; `detrax eval` of the run writes it"):
        auto_thresholds(str(tmp_path / "none.json"))
