"""Extension points: a toy matcher, backbone and data source, each registered from outside the package, is
validated by the configs and trains; a toy export format is taken by `detrax export`."""

import io
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import PLAIN
from flax import nnx

from detrax import cli
from detrax.config import presets
from detrax.config.overrides import override
from detrax.criterion import matching
from detrax.data import sources
from detrax.data.coco import Dataset
from detrax.data.synthetic import SHAPES, scene, write_dataset
from detrax.models.backbones import registry as backbones
from detrax.training.loop import Run, fit

FAST = [*PLAIN, "train.steps=2", "train.batch_size=2", "train.log_every=1", "train.eval_every=0", "data.val_split=none",
        "data.bucket_step=192"]


def _losses(workdir):
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return rows, [r["loss"] for r in rows if r["kind"] == "train"]


def in_order(cost, valid):
    """A toy matcher: target slot j gets query j (valid targets only): cost [L, B, N, M], valid [B, M] ->
    [L, B, M]."""
    m = cost.shape[-1]
    return jnp.broadcast_to(jnp.where(valid, jnp.arange(m, dtype=jnp.int32), -1), cost.shape[:-2] + (m,))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=8, seed=5)
    return str(root)


def test_a_registered_matcher_is_validated_and_trains(synth, tmp_path):
    with pytest.raises(ValueError, match="matcher must be one of"):
        override(presets.get("tiny"), ["loss.matcher=in_order"])
    matching.register_matcher("in_order", in_order)
    try:
        cfg = override(presets.get("demo"), ["loss.matcher=in_order", *FAST])
        fit(cfg, Run(synth, str(tmp_path / "run"), quiet=False))
    finally:
        del matching.MATCHERS["in_order"]
    rows, losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and np.isfinite(losses).all()
    assert rows[0]["record"]["config"]["loss"]["matcher"] == "in_order"


class Patches(nnx.Module):
    """A toy backbone: one 32x32 convolution of stride 32, patch features as in a ViT's stem."""

    def __init__(self, config, rngs):
        self.proj = nnx.Conv(3, 48, (32, 32), strides=32, padding="VALID", rngs=rngs)
        self.out_channels = 48

    def stages(self, x, mask=None, calibrate=False):
        return [jax.nn.relu(self.proj(x))]

    def __call__(self, x, mask=None):
        return self.stages(x, mask)[-1]


def test_a_registered_backbone_is_validated_builds_and_trains(synth, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown backbone 'patches'"):
        override(presets.get("demo"), ["model.backbone=patches"])
    backbones.register(backbones.Backbone("patches", Patches))
    try:
        cfg = override(presets.get("demo"), ["model.backbone=patches", *FAST])
        fit(cfg, Run(synth, str(tmp_path / "run"), quiet=False))  # calibration skipped: it has no frozen statistics
        import detrax

        detector = detrax.load(str(tmp_path / "run"))  # rebuilt from the run's config through the registry
        assert isinstance(detector.model.backbone, Patches)
        first = sorted(Path(synth, "val").iterdir())
        assert isinstance(detector.predict(str(first[0]), threshold=0.0), dict)
    finally:
        del backbones.FAMILIES["patches"]
    _, losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and np.isfinite(losses).all()


class Shapes:
    """A toy data source: `shapes:N` is N synthetic scenes made in memory (no files), split train / val."""

    def claims(self, data):
        return data.startswith("shapes:")

    def splits(self, data):
        return ["train", "val"]

    def read(self, data, split, skip_bad=False):
        rng = np.random.default_rng(0 if split == "train" else 1)
        records = []
        for i in range(int(data.split(":")[1])):
            image, boxes, labels = scene(rng, 128, 160)
            encoded = io.BytesIO()
            image.save(encoded, "PNG")
            records.append({"image_id": i + 1, "file": f"{data}/{split}/{i}", "image_bytes": encoded.getvalue(),
                            "width": 160, "height": 128, "boxes": boxes, "labels": (labels + 1).astype(np.int32)})
        return Dataset(data, split, None, f"{data}/{split}", records, dict(enumerate(SHAPES, 1)), [],
                       {"crowd": 0, "degenerate": 0})

    def ground_truth(self, ds):
        anns = [{"id": k + 1000 * r["image_id"], "image_id": r["image_id"], "category_id": int(c), "iscrowd": 0,
                 "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "area": float((x1 - x0) * (y1 - y0))}
                for r in ds.records for k, ((x0, y0, x1, y1), c) in enumerate(zip(r["boxes"], r["labels"]))]
        return {"images": [{"id": r["image_id"], "width": r["width"], "height": r["height"]} for r in ds.records],
                "annotations": anns, "categories": [{"id": k, "name": v} for k, v in ds.names.items()]}


def test_a_registered_data_source_trains_evaluates_and_checks(tmp_path, capsys):
    sources.register_source(Shapes())
    try:
        assert cli.main(["data", "check", "shapes:4"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and report["splits"]["val"]["images"] == 4
        # the demo's batches of 8 images of 128x160: test_train's program, compiled once
        cfg = override(presets.get("demo"), [*PLAIN, "train.steps=2", "train.log_every=1", "data.val_split=val"])
        summary = fit(cfg, Run("shapes:8", str(tmp_path / "run"), quiet=False))  # evaluated on its ground truth
    finally:
        sources.SOURCES.pop(0)
    assert set(summary["eval"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    rows, losses = _losses(tmp_path / "run")
    assert len(losses) == 2 and rows[0]["record"]["data"]["path"] == "shapes:8"


def test_a_registered_export_format_is_taken_by_the_cli(tmp_path, capsys):
    """A toy export format (the weights as .npz, the input shape beside them) through `detrax export`."""
    from detrax.models.detr import weight_arrays
    from detrax.serving import export

    def arrays(detector, path, shape):
        np.savez(path, **{k: np.asarray(v) for k, v in weight_arrays(detector.model).items()},
                 input_shape=np.array([shape.batch, shape.height, shape.width]))

    import detrax

    detrax.load("random:tiny").save(tmp_path / "w.safetensors")
    export.register_format("arrays", arrays)
    try:
        assert cli.main(["export", str(tmp_path / "w.safetensors"), str(tmp_path / "out.npz"), "--format", "arrays",
                         "--batch", "2", "--size", "96x128"]) == 0
    finally:
        del export.FORMATS["arrays"]
    assert json.loads(capsys.readouterr().out)["format"] == "arrays"
    saved = np.load(tmp_path / "out.npz")
    assert saved["input_shape"].tolist() == [2, 96, 128] and "class_embed/kernel" in saved.files


def test_a_registered_runtime_runs_predict(tmp_path, capsys):
    """A toy runtime (XLA's, counting the images it sees) through `detrax predict --runtime`."""
    from detrax.serving import runtimes

    seen = []

    def counting(detector):
        xla = runtimes.make("xla", detector)

        def infer(pixels, mask, orig_size):
            seen.append(len(mask))
            return xla(pixels, mask, orig_size)

        return infer

    import detrax

    detrax.load("random:tiny").save(tmp_path / "w.safetensors")
    runtimes.register_runtime("counting", counting)
    try:
        assert cli.main(["predict", str(tmp_path / "w.safetensors"), "--generate", "3", "--out", str(tmp_path / "p"),
                         "--size", "96", "--max-size", "128", "--runtime", "counting"]) == 0
    finally:
        del runtimes.RUNTIMES["counting"]
    assert sum(seen) >= 3  # the generated scenes went through it (short batches are filled with blanks)
    assert len(list((tmp_path / "p").glob("scene*.jpg"))) == 3
    assert cli.main(["predict", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "q"), "--generate", "1",
                     "--runtime", "counting"]) == 2
    assert "unknown runtime 'counting'" in capsys.readouterr().err
