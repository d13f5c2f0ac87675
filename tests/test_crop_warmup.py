"""The backbone's warm-up on the training objects (detrax.training.crop_warmup, detrax.data.crops): windows cut at the
detector's scale, a backbone that learns from them while everything else stays as it was, and a run that
records it."""

import json

import jax
import numpy as np
import pytest
from conftest import PLAIN, RUNS_LONG
from flax import nnx
from PIL import Image

import detrax
from detrax.config import presets
from detrax.config.overrides import override
from detrax.config.schema import DataConfig
from detrax.data.crops import object_crops
from detrax.data.synthetic import write_dataset
from detrax.models.backbones.resnet import Frozen
from detrax.training import step as train_step
from detrax.training.crop_warmup import warm_up
from detrax.training.loop import Run, fit

RED, BLUE = (220, 30, 30), (30, 30, 220)


def _record(path, image_id, size, objects, background=(128, 128, 128)):
    """A record as `read_coco` gives it, its image drawn: objects [(label, (x0, y0, x1, y1), colour)]."""
    image = Image.new("RGB", size, background)
    for _, box, colour in objects:
        image.paste(colour, box)
    image.save(path)
    return {"image_id": image_id, "file": str(path), "width": size[0], "height": size[1],
            "boxes": np.array([b for _, b, _ in objects], np.float32).reshape(-1, 4),
            "labels": np.array([c for c, _, _ in objects], np.int32)}


def _red(windows):
    return (windows[..., 0] > 150) & (windows[..., 2] < 100)  # [N, S, S]


def test_windows_hold_each_object_at_the_training_scale(tmp_path):
    # a 200x100 image whose shorter side the training resize makes 50: x0.5, so a 64-pixel window spans 128
    record = _record(tmp_path / "a.png", 1, (200, 100), [(3, (90, 40, 110, 60), RED), (5, (0, 0, 20, 20), RED)])
    windows, labels = object_crops([record], DataConfig(scales=(50,), max_size=1000), variants=4)
    assert windows.shape == (8, 64, 64, 3) and windows.dtype == np.uint8
    assert labels.tolist() == [3] * 4 + [5] * 4
    red = _red(windows)
    for w in red:  # each object 20 pixels a side, 10 at that scale
        assert 70 <= w.sum() <= 130, w.sum()
        ys, xs = np.nonzero(w)
        assert abs(ys.mean() - 32) < 5 and abs(xs.mean() - 32) < 5  # centred, give or take the jitter
    corner = windows[4:].astype(int).sum(-1)  # the object in the corner: its windows leave the image
    assert ((corner == 0).mean((1, 2)) > 0.2).all()  # black outside the image
    # without augmentation the training resize is the val transform's: here x1, the object 20 pixels
    windows, _ = object_crops([record], DataConfig(scales=(50,), val_size=100, max_size=1000, augment=False),
                              variants=2)
    assert all(300 <= w.sum() <= 500 for w in _red(windows[:2]))


def test_windows_stop_at_max_crops_and_empty_images_give_none(tmp_path):
    records = [_record(tmp_path / f"{i}.png", i, (64, 64), [(1, (20, 20, 40, 40), RED)]) for i in range(3)]
    empty = _record(tmp_path / "e.png", 9, (64, 64), [])
    windows, labels = object_crops([empty, *records], DataConfig(scales=(64,), max_size=64), variants=2,
                                   max_crops=5)
    assert windows.shape[0] == 4 and labels.tolist() == [1] * 4  # two images of two windows: a third would pass 5
    windows, labels = object_crops([empty], DataConfig(scales=(64,), max_size=64))
    assert windows.shape == (0, 64, 64, 3) and labels.shape == (0,)


def _colour_records(tmp_path, n=8):
    """Images of red (class 1) and blue (class 2) squares on grey: a classifier's easiest task."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        objects = []
        for j in range(2):
            x, y, s = int(rng.integers(0, 60)), int(rng.integers(0, 60)), int(rng.integers(12, 30))
            objects.append((1 + (i + j) % 2, (x, y, x + s, y + s), RED if (i + j) % 2 == 0 else BLUE))
        records.append(_record(tmp_path / f"c{i}.png", i, (96, 96), objects))
    return records


def test_warm_up_trains_the_backbone_alone_and_learns_the_classes(tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "compiler_options", lambda: RUNS_LONG)  # 80 steps: the product's level
    cfg = override(presets.get("tiny"), ["train.crop_steps=40", "train.crop_lr=3e-3", "data.scales=[96]",
                                                 "data.max_size=96"])
    records = _colour_records(tmp_path)
    model = detrax.DETR(cfg.model, rngs=nnx.Rngs(0))
    weights = nnx.Any(nnx.Param, Frozen)
    before = nnx.to_flat_state(nnx.clone(nnx.state(model, weights)))
    lines = []
    done = warm_up(model, records, cfg, lines.append)
    assert done["steps"] == 40 and done["windows"] == 16 * 8 and done["accuracy"] >= 0.9, done
    assert lines[0].startswith("backbone warm-up: 40 steps") and lines[-1].startswith("backbone warm-up done")
    changed = set()
    for (path, old), (_, new) in zip(before, nnx.to_flat_state(nnx.state(model, weights)), strict=True):
        if not np.array_equal(np.asarray(old.get_value()), np.asarray(new.get_value())):
            changed.add(path)
            assert path[0] == "backbone" and isinstance(new, nnx.Param), path  # frozen statistics stay
    assert changed, "the backbone did not train"
    again = detrax.DETR(cfg.model, rngs=nnx.Rngs(0))
    warm_up(again, records, cfg)
    same = jax.tree.map(np.array_equal, nnx.state(model, nnx.Param), nnx.state(again, nnx.Param))
    assert all(jax.tree.leaves(same)), "the warm-up is not deterministic"


def test_a_run_records_its_warm_up_and_resumes_without_it(tmp_path, capsys):
    root = tmp_path / "synth"
    write_dataset(str(root), num_images=12, seed=3, shape=presets.DEMO_SHAPE)  # one compilation
    cfg = override(presets.get("demo"), [*PLAIN, "train.steps=2", "train.eval_every=0", "train.ckpt_every=1",
                                                 "train.crop_steps=3", "data.workers=0", "data.val_split=none"])
    fit(cfg, Run(str(root), str(tmp_path / "run")))
    record = json.load(open(tmp_path / "run" / "run.json"))
    assert record["crop_warmup"]["steps"] == 3 and record["crop_warmup"]["windows"] > 0
    err = capsys.readouterr().err
    assert "frozen batch norm calibrated" in err and "backbone warm-up done" in err
    longer = override(cfg, ["train.steps=3"])
    fit(longer, Run(str(root), str(tmp_path / "run"), resume=True, allow_changes=True))
    assert "backbone warm-up" not in capsys.readouterr().err  # a checkpoint holds the warmed-up backbone


@pytest.mark.parametrize("setting", ["train.crop_steps=-1", "train.crop_lr=0"])
def test_bad_warm_up_settings_are_refused(setting):
    with pytest.raises(ValueError, match="crop_steps must be at least 0"):
        override(presets.get("tiny"), [setting])
