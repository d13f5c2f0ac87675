"""The official DETR transforms on hand-computed cases; determinism from a seed."""

import numpy as np
import pytest
from PIL import Image

from detrax.config.schema import DataConfig, ModelConfig
from detrax.data import transforms as T


def _target(boxes, labels=None):
    boxes = np.array(boxes, np.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": np.arange(len(boxes)) if labels is None else np.array(labels)}


def _image(w, h):
    x = np.zeros((h, w, 3), np.uint8)
    x[:, : w // 2] = 255  # left half white: flips and crops are visible
    return Image.fromarray(x)


def test_hflip():
    image, target = T.hflip(_image(100, 50), _target([[10, 5, 30, 25]]))
    np.testing.assert_allclose(target["boxes"], [[70, 5, 90, 25]])
    assert np.asarray(image)[0, -1, 0] == 255 and np.asarray(image)[0, 0, 0] == 0


def test_resize_scales_boxes():
    image, target = T.resize_with_target(_image(200, 100), _target([[20, 10, 60, 50]]), 50)
    assert image.size == (100, 50)
    np.testing.assert_allclose(target["boxes"], [[10, 5, 30, 25]])


def test_crop_shifts_clips_and_drops():
    image, target = T.crop(_image(100, 100), _target([[10, 10, 40, 40], [50, 50, 90, 90], [0, 0, 15, 15]]),
                           top=20, left=20, height=50, width=40)
    assert image.size == (40, 50)
    np.testing.assert_allclose(target["boxes"], [[0, 0, 20, 20], [30, 30, 40, 50]])  # the third lies outside
    np.testing.assert_array_equal(target["labels"], [0, 1])


def test_to_model_input_normalises():
    image = _image(100, 50)
    pixels, target = T.to_model_input(image, _target([[10, 5, 30, 25]]))
    np.testing.assert_allclose(target["boxes"], [[0.2, 0.3, 0.2, 0.4]], rtol=1e-6)
    assert pixels.shape == (50, 100, 3) and pixels.dtype == np.uint8
    canvas = np.zeros((1, 64, 128, 3), np.uint8)
    canvas[0, :50, :100] = pixels
    mask = np.zeros((1, 64, 128), bool)
    mask[0, :50, :100] = True
    c = ModelConfig(backbone="resnet50", num_classes=1)  # the official (ImageNet) mean and std
    mean, std = np.array(c.pixel_mean, np.float32), np.array(c.pixel_std, np.float32)
    x = np.asarray(T.normalize_batch(canvas, mask, c.pixel_mean, c.pixel_std))
    official = (np.asarray(image, np.float32) / 255.0 - mean) / std  # ToTensor, then Normalize
    np.testing.assert_allclose(x[0, :50, :100], official, rtol=1e-6)
    np.testing.assert_allclose(x[0, 0, 0], (1 - mean) / std, rtol=1e-6)
    assert (x[0, 50:] == 0).all() and (x[0, :, 100:] == 0).all()  # padding is zero after normalisation


def test_train_plan_crop_bounds_and_planned_size_is_the_result():
    cfg, crops = DataConfig(), 0  # the official sizes
    for seed in range(60):
        for w, h in ((700, 500), (500, 700), (1000, 250), (300, 200)):
            steps, size = T.train_plan(h, w, np.random.default_rng(seed), cfg)
            for op, *args in steps:
                if op == "crop":
                    crops += 1
                    top, left, ch, cw = args
                    assert top >= 0 and left >= 0 and ch <= 600 and cw <= 600
            # the shape the batcher plans is the shape the transform makes, from the same seed
            pixels, _ = T.train_transform(_image(w, h), _target([[0, 0, 10, 10]]), np.random.default_rng(seed), cfg)
            assert pixels.shape[:2] == size
    assert crops > 30


def test_train_transform_is_deterministic_and_in_range():
    cfg = DataConfig()
    scales = cfg.scales
    image, target = _image(640, 480), _target([[100, 100, 300, 200], [400, 50, 600, 400]])
    outs = [T.train_transform(image, target, np.random.default_rng(7), cfg) for _ in range(2)]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1]["boxes"], outs[1][1]["boxes"])
    sizes = set()
    for seed in range(40):
        pixels, t = T.train_transform(image, target, np.random.default_rng(seed), cfg)
        assert min(pixels.shape[:2]) in scales and max(pixels.shape[:2]) <= 1333
        b = t["boxes"]
        assert ((b[:, :2] > 0) & (b[:, :2] < 1)).all() and ((b[:, 2:] > 0) & (b[:, 2:] <= 1)).all()
        sizes.add(pixels.shape[:2])
    assert len(sizes) > 5  # scales and crops really vary


@pytest.mark.parametrize("w,h,want", [(640, 480, (800, 1066)), (480, 640, (1066, 800)), (1000, 250, (333, 1332))])
def test_val_transform_sizes(w, h, want):
    pixels, _ = T.val_transform(_image(w, h), _target([[1, 1, 5, 5]]), 800, 1333)
    assert pixels.shape[:2] == want
