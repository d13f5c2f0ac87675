"""The converted HF DETR-R50 gives HF's outputs, every decoder layer, on a padded batch of two sizes."""

import numpy as np
import pytest
from conftest import compiled
from hf_reference import build_hf_detr, hf_all_layers, padded_batch

from detrax.weights import convert as cv

SIZES = [(96, 128), (128, 80)]  # padded to 128 x 128: both images carry padding


@pytest.fixture(scope="module")
def hf_r50():
    return build_hf_detr()


@pytest.fixture(scope="module")
def batch():
    return padded_batch(SIZES)


def _detrax_all_layers(model, pixels, mask):
    out = compiled(model, pixels, mask)
    logits = np.stack([a["pred_logits"] for a in out["aux_outputs"]] + [out["pred_logits"]])
    boxes = np.stack([a["pred_boxes"] for a in out["aux_outputs"]] + [out["pred_boxes"]])
    return logits, boxes


def test_r50_matches_hf_every_decoder_layer(hf_r50, batch):
    pixels, mask = batch
    want_logits, want_boxes = hf_all_layers(hf_r50, pixels, mask)
    sd = {k: v.numpy() for k, v in hf_r50.state_dict().items()}
    model, report = cv.convert(sd)
    assert report["format"] == "hf" and report["config"].backbone == "resnet50"
    assert report["config"].num_classes == 91 and report["fresh"] == []
    logits, boxes = _detrax_all_layers(model, pixels, mask)
    assert logits.shape == (6, 2, 100, 92) and boxes.shape == (6, 2, 100, 4)
    assert np.abs(want_logits).max() > 0.1  # a real signal, not all zeros
    np.testing.assert_allclose(logits, want_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4, rtol=0)
