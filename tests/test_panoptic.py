"""Panoptic and instance post-processing against an independent rendering of the official PostProcessPanoptic
and PostProcessSegm, and hand-made cases."""

import numpy as np
import pytest
from conftest import require

from detrax.serving.panoptic import instance_masks, panoptic_segments

torch = require("torch")
import official_reference as ref  # noqa: E402

IS_THING = {0: True, 1: True, 2: True, 3: False, 4: False}


def _random_outputs(seed, q=12, c=5, h4=10, w4=13):
    rs = np.random.default_rng(seed)
    logits = rs.normal(0, 1, (q, c + 1)).astype(np.float32)
    sure = rs.random(q) < 0.7
    logits[sure, rs.integers(0, c + 1, sure.sum())] += 6  # confident queries, some of them no-object
    logits[0, :] = 0
    logits[0, 3] = logits[1, 3] = 9  # two queries of one stuff category: one segment
    logits[1, :3] = logits[1, 4:] = 0
    masks = rs.normal(0, 1, (q, h4, w4)).astype(np.float32)
    masks = masks + 3 * rs.random((q, 1, 1)).astype(np.float32)  # some queries take more pixels
    return logits, masks


@pytest.mark.parametrize("seed,size,target", [(0, (37, 50), None), (1, (37, 50), (60, 81)), (2, (40, 52), (20, 26)),
                                              (3, (37, 50), (37, 50))])
def test_panoptic_equals_the_official(seed, size, target):
    logits, masks = _random_outputs(seed)
    target = target or size
    want_ids, want_segs = ref.post_process_panoptic(torch.from_numpy(logits), torch.from_numpy(masks), size,
                                                    target, IS_THING)
    ids, segs = panoptic_segments(logits, masks, size, target, IS_THING)
    assert len(segs) >= 2 and ids.shape == tuple(target)
    np.testing.assert_array_equal(ids, np.asarray(want_ids) + 1)  # detrax's ids from 1: 0 stays void
    assert [(s["id"] - 1, s["category_id"], s["isthing"], s["area"]) for s in segs] == [
        (s["id"], s["category_id"], s["isthing"], s["area"]) for s in want_segs]
    assert sum(s["category_id"] == 3 for s in segs) == 1  # the two stuff queries merged


def test_small_and_losing_segments_are_dropped_and_the_rest_refilled():
    logits = np.full((4, 3), -5.0, np.float32)
    logits[:, 0] = 5  # all four confident, class 0 (a thing)
    masks = np.zeros((4, 4, 4), np.float32)
    masks[0] = 1  # wins where the others do not ...
    masks[1, 0, 0] = 1.05  # ... a corner of the map: bilinearly above 1 on a 2 x 2 corner at 16 x 16 (area 4)
    masks[2] = -1  # wins nowhere
    masks[3, :, 2:] = 10  # bilinearly above 1 from output column 6 on (160 pixels)
    ids, segs = panoptic_segments(logits, masks, (16, 16), (16, 16), {0: True})
    assert [(s["id"], s["area"]) for s in segs] == [(1, 96), (2, 160)]  # query 0 took the corner back
    _, kept = panoptic_segments(logits, masks, (16, 16), (16, 16), {0: True}, min_area=4)
    assert [s["area"] for s in kept] == [92, 4, 160]  # with segments of 4 pixels allowed, the corner stays
    assert set(np.unique(ids).tolist()) == {1, 2}
    none, segs = panoptic_segments(np.zeros((4, 3), np.float32), masks, (16, 16))  # nothing confident
    assert segs == [] and none.shape == (16, 16) and not none.any()


def test_padded_maps_are_cropped_to_the_image_first():
    masks = np.full((1, 8, 8), -3.0, np.float32)
    masks[0, :4, :3] = 3  # the image is 16 x 12 of a padded 32 x 32 batch: its map is 4 x 3
    m = instance_masks(masks, (16, 12))
    assert m.shape == (1, 16, 12) and m.all()  # the whole image; the padded region's negatives are cut away
    big = instance_masks(masks, (16, 12), (32, 24))
    assert big.shape == (1, 32, 24) and big.all()


def test_instance_masks_equal_the_official_for_an_unpadded_image():
    rs = np.random.default_rng(0)
    masks = rs.normal(0, 2, (5, 10, 13)).astype(np.float32)
    size, orig = (37, 50), (74, 99)
    t = torch.nn.functional.interpolate(torch.from_numpy(masks)[None], size=size, mode="bilinear",
                                        align_corners=False)[0]
    t = torch.nn.functional.interpolate((t.sigmoid() > 0.5).float()[:, None], size=orig, mode="nearest")[:, 0]
    np.testing.assert_array_equal(instance_masks(masks, size, orig), t.numpy().astype(bool))
