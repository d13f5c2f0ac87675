"""Post-processing equals HF's post_process_object_detection (and so the official PostProcess)."""

from types import SimpleNamespace

import numpy as np
from conftest import require

from detrax.serving.postprocess import postprocess, select


def test_equals_hf_post_process_object_detection(rng):
    torch = require("torch")
    transformers = require("transformers")
    logits = (3 * rng.standard_normal((3, 20, 8))).astype(np.float32)
    boxes = rng.uniform(0.05, 0.95, (3, 20, 4)).astype(np.float32)
    sizes = [(480, 640), (333, 500), (800, 1216)]
    proc = transformers.models.detr.image_processing_pil_detr.DetrImageProcessorPil()
    want = proc.post_process_object_detection(
        SimpleNamespace(logits=torch.from_numpy(logits), pred_boxes=torch.from_numpy(boxes)), threshold=0.3,
        target_sizes=sizes)
    got = select(*postprocess({"pred_logits": logits, "pred_boxes": boxes}, np.array(sizes)), threshold=0.3)
    assert sum(len(w["scores"]) for w in want) > 5  # the threshold keeps some, drops others
    assert sum(len(w["scores"]) for w in want) < 60
    for g, w in zip(got, want):
        order = np.argsort(-w["scores"].numpy(), kind="stable")  # HF keeps query order; detrax sorts by score
        np.testing.assert_allclose(g["scores"], w["scores"].numpy()[order], rtol=1e-6)
        np.testing.assert_array_equal(g["labels"], w["labels"].numpy()[order])
        np.testing.assert_allclose(g["boxes"], w["boxes"].numpy()[order], rtol=1e-5, atol=1e-3)


def test_no_object_never_wins_a_label():
    logits = np.zeros((1, 2, 4), np.float32)
    logits[0, :, -1] = 10.0  # no-object dominates both queries
    scores, labels, _ = postprocess({"pred_logits": logits, "pred_boxes": np.full((1, 2, 4), 0.5, np.float32)},
                                    np.array([[10, 10]]))
    assert (np.asarray(labels) < 3).all() and float(np.asarray(scores).max()) < 0.01
