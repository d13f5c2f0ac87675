"""The Python API and the CLI: same detections, outputs on disk, bad input."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import detrax
from detrax import cli
from detrax.data.synthetic import scene
from detrax.data.transforms import resized_size

SIZE = dict(size=128, max_size=200)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    detrax.load("random:tiny").save(path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(120, 160), (200, 90), (150, 150)]):
        scene(rng, h, w)[0].save(folder / f"{i:012d}.png")
    return folder


def test_resized_size_as_official():
    assert resized_size(640, 480, 800, 1333) == (800, 1066)
    assert resized_size(480, 640, 800, 1333) == (1066, 800)
    assert resized_size(2000, 500, 800, 1333) == (333, 1332)  # capped: size round(333.25), then int(1332.0)
    assert resized_size(800, 600, 600, 1333) == (600, 800)


def test_api_and_cli_agree(weights, images, tmp_path, capsys):
    det = detrax.load(weights)
    files = sorted(str(p) for p in images.iterdir())
    api = det.predict(files, threshold=0.0, batch_size=2, **SIZE)
    assert len(api) == 3 and all(len(d["scores"]) == det.config.num_queries for d in api)
    assert set(api[0]) == {"boxes", "scores", "labels", "names", "queries"}
    one = det.predict(Image.open(files[1]), threshold=0.0, **SIZE)  # a single PIL image -> a single dict
    np.testing.assert_allclose(one["boxes"], api[1]["boxes"], atol=1e-3)  # alone or batched: the same
    arr = det.predict(np.asarray(Image.open(files[2]).convert("RGB")), threshold=0.0, **SIZE)
    np.testing.assert_allclose(arr["scores"], api[2]["scores"], atol=1e-6)

    out = tmp_path / "out"
    rc = cli.main(["predict", weights, str(images), "--out", str(out), "--threshold", "0", "--batch-size", "2",
                   "--size", "128", "--max-size", "200"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["images"] == 3 and summary["skipped"] == 0 and summary["detections"] == 30
    results = json.load(open(out / "results.json"))
    for i, d in enumerate(api):
        mine = [r for r in results if r["image_id"] == i]
        assert len(mine) == len(d["scores"])
        np.testing.assert_allclose(sorted(r["score"] for r in mine), sorted(d["scores"]), atol=1e-4)
        x0, y0, x1, y1 = d["boxes"][0]
        assert mine[0]["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
    for i, f in enumerate(files):
        drawn = Image.open(out / f"{i:012d}.jpg")
        assert drawn.size == Image.open(f).size


def test_unreadable_files_are_skipped_and_counted(weights, images, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.open(next(images.iterdir())).save(bad / "good.png")
    rc = cli.main(["predict", weights, str(bad), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o"),
                   "--size", "128", "--max-size", "200"])
    captured = capsys.readouterr()
    assert rc == 0
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["images"] == 1 and summary["skipped"] == 2
    assert "broken.jpg: not a readable image" in captured.err and "missing.png" in captured.err


def test_unwritable_output_folder_fails_before_any_work(weights, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot be written"):
        cli.main(["predict", weights, "--out", str(blocker / "sub")])


def test_generated_scenes_with_random_weights(tmp_path, capsys):
    rc = cli.main(["predict", "random:tiny", "--out", str(tmp_path), "--generate", "1", "--threshold", "0",
                   "--size", "96", "--max-size", "128"])
    out = capsys.readouterr().out
    assert rc == 0 and "RANDOM weights" in out
    assert os.path.exists(tmp_path / "inputs" / "scene000.jpg") and os.path.exists(tmp_path / "scene000.jpg")


def test_bad_checkpoint_is_a_clear_error(weights, tmp_path, capsys):
    """A missing file, junk, and a detrax file cut short: each named, no traceback."""
    (tmp_path / "junk.pth").write_bytes(b"not weights at all")
    (tmp_path / "cut.safetensors").write_bytes(Path(weights).read_bytes()[:5000])
    for name in ("nope.safetensors", "junk.pth", "cut.safetensors"):
        assert cli.main(["predict", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2, name
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err, err


def test_results_load_in_pycocotools(weights, images, tmp_path, capsys):
    from conftest import require

    coco_mod = require("pycocotools.coco")
    rc = cli.main(["predict", weights, str(images), "--out", str(tmp_path), "--threshold", "0", "--size", "128",
                   "--max-size", "200"])
    assert rc == 0
    files = sorted(os.listdir(images))
    gt = coco_mod.COCO()
    gt.dataset = {"images": [{"id": i, "file_name": f, "width": 10, "height": 10} for i, f in enumerate(files)],
                  "annotations": [], "categories": [{"id": i, "name": str(i)} for i in range(6)]}
    gt.createIndex()
    res = gt.loadRes(str(tmp_path / "results.json"))
    assert len(res.getAnnIds()) == 30 and set(res.getImgIds()) == {0, 1, 2}


def test_detections_do_not_depend_on_the_batch(weights, images):
    det = detrax.load(weights)
    files = sorted(str(p) for p in images.iterdir())
    alone = [det.predict(f, threshold=0.0, **SIZE) for f in files]
    together = det.predict(files + files[::-1], threshold=0.0, batch_size=4, **SIZE)
    for a, b in zip(alone + alone[::-1], together):
        np.testing.assert_array_equal(a["queries"], b["queries"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)


def test_attention_panels_for_each_detection(weights, images, tmp_path, capsys):
    rc = cli.main(["predict", weights, str(images), "--out", str(tmp_path), "--threshold", "0", "--size", "128",
                   "--max-size", "200", "--attention", "--attention-points", "1"])
    assert rc == 0
    det = detrax.load(weights)
    first = sorted(images.iterdir())[0]
    d = det.predict(str(first), threshold=0.0, **SIZE)
    panel = det.attention(str(first), d, points=[(10, 10)], **SIZE)
    rows = len(d["scores"]) + 1  # one per detection, one per point
    assert panel.height % rows == 0 and panel.height // rows > 20
    drawn = Image.open(tmp_path / f"{first.stem}_attention.png")
    assert drawn.height == (len(d["scores"]) + 1) * (panel.height // rows)
    arr = np.asarray(panel)
    assert arr.std() > 10  # not blank


def test_attention_weights_are_distributions(weights):
    import jax.numpy as jnp

    from detrax.serving.attention_maps import forward_with_attention

    det = detrax.load(weights)
    x = np.random.default_rng(0).standard_normal((1, 128, 128, 3)).astype(np.float32)
    mask = np.zeros((1, 128, 128), bool)
    mask[:, :96, :64] = True
    out, cross, selfa = forward_with_attention(det.model, jnp.asarray(x), jnp.asarray(mask))
    assert cross.shape == (1, det.config.num_queries, 4, 4) and selfa.shape == (1, 16, 4, 4)
    np.testing.assert_allclose(np.asarray(cross.sum((-1, -2))), 1.0, atol=1e-5)
    assert float(np.asarray(cross)[0, :, :, 2:].max()) == 0.0  # padded columns get no attention
    np.testing.assert_allclose(np.asarray(out["pred_boxes"]), np.asarray(det(x, mask)["pred_boxes"]), atol=1e-5)


def test_set_weights_keeps_compiled_shapes(weights):
    import jax.numpy as jnp
    from flax import nnx

    from detrax.models.detr import DETR, weight_arrays

    det = detrax.load(weights)
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    before = np.asarray(det(x)["pred_boxes"])
    other = DETR(det.config, rngs=nnx.Rngs(9))
    other.eval()
    det.set_weights({k: np.asarray(v) for k, v in weight_arrays(other).items()})
    compiled = det._forward._cache_size()
    after = np.asarray(det(x)["pred_boxes"])
    assert det._forward._cache_size() == compiled  # no new compilation for the new weights
    assert not np.allclose(before, after)
    np.testing.assert_allclose(after, np.asarray(other(jnp.asarray(x))["pred_boxes"]), atol=1e-5)


def test_per_image_and_batched_forward_agree(weights):
    """`per_image` (image by image inside one compiled call, the CPU default) changes speed, not results."""
    model = detrax.load(weights).model
    a, b = detrax.Detector(model, per_image=True), detrax.Detector(model, per_image=False)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 64, 96, 3)).astype(np.float32)
    mask = np.ones((3, 64, 96), bool)
    mask[1, 40:], mask[2, :, 50:] = False, False
    out_a, out_b = a(pixels, mask), b(pixels, mask)
    for key in ("pred_logits", "pred_boxes"):
        assert out_a[key].shape == out_b[key].shape == (3, model.config.num_queries) + out_b[key].shape[2:]
        np.testing.assert_allclose(np.asarray(out_a[key]), np.asarray(out_b[key]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out_a["aux_outputs"][0]["pred_boxes"]),
                               np.asarray(out_b["aux_outputs"][0]["pred_boxes"]), atol=1e-5)
