"""Training: the loss falls, a tiny DETR overfits 4 images, exact resume, config errors, evaluation."""

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_LAYER, PLAIN
from PIL import Image

from detrax import cli
from detrax.config import presets
from detrax.config.overrides import override
from detrax.data.synthetic import write_dataset
from detrax.training.loop import Run, fit

# the demo's model without its aids, no evaluation (the tests that need one ask for it): the tests of this file (and
# test_crop_warmup's run) train one program, compiled once
FAST = ["train.log_every=1", "train.eval_every=0", "data.workers=0", "data.val_split=none", *PLAIN]
AIDS = ["model.query_groups=4", "model.dn_groups=2", "model.encoder_head=true"]  # the demo's own


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """One image shape, the demo's: each run compiles its train step once (compilation is most of a test's time)."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=24, seed=3, shape=presets.DEMO_SHAPE)
    return str(root)


def _cfg(*overrides):
    return override(presets.get("demo"), FAST + list(overrides))


def _set_loss(row, weights=(("loss_ce", 1.0), ("loss_bbox", 5.0), ("loss_giou", 2.0))) -> float:
    """DETR's own set loss from a metrics row's terms (the official weights, every decoder layer): what the
    training-only aids' losses (`loss_groups`, `loss_dn`, `loss_enc`) add to `loss` is left out."""
    return sum(w * v for k, v in row.items() for term, w in weights if k == term or k.startswith(f"{term}_")
               and k[len(term) + 1:].isdigit())


@pytest.fixture(scope="module")
def aided_run(synth, tmp_path_factory):
    """30 steps of the demo with its training-only aids: test_loss_falls's run, which test_eval_cli... evaluates."""
    workdir = tmp_path_factory.mktemp("aided")
    fit(_cfg("train.steps=30", "train.lr=1e-3", *AIDS), Run(synth, str(workdir), quiet=False))
    return workdir


def test_loss_falls(aided_run):
    """With the demo's training-only aids on, DETR's own set loss falls (not only the sum with theirs): the last
    five steps' mean 0.80 of the first five's (0.81 on one CPU thread), 1.00 with both learning rates at 0."""
    tmp_path = aided_run
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    own = [_set_loss(r) for r in rows]
    assert len(rows) == 30 and np.isfinite(own).all() and all(r["loss"] > o for r, o in zip(rows, own))
    assert np.mean(own[-5:]) < 0.85 * np.mean(own[:5]), own
    for name in ("losses.png", "metrics.jsonl"):
        assert (tmp_path / name).exists()
    import detrax

    assert detrax.load(str(tmp_path)).names == {1: "rectangle", 2: "ellipse", 3: "triangle"}
    assert any((tmp_path / "tensorboard").iterdir())


def test_overfits_four_images_to_ap50(tmp_path):
    """Measured (AP50 every 25 steps, AVX2 EPYC): 0.04, 0.42, 1.0, 0.98, 1.0, 1.0 at 96 pixels a side; at the
    demo's 128, 0.50 at 100 steps, 0.94 at 150, 0.98 at 200 (a slower step, too)."""
    root = tmp_path / "four"
    write_dataset(str(root), num_images=5, seed=11, val_fraction=0.2)  # 4 train images
    cfg = _cfg("train.steps=150", "train.lr=1e-3", "train.lr_backbone=1e-3", "data.val_split=train",
               "train.lr_drop=1000", "train.log_every=50", "data.val_size=96", "data.max_size=128")
    summary = fit(cfg, Run(str(root), str(tmp_path / "run"), quiet=True))
    assert summary["eval"]["AP50"] >= 0.9, summary["eval"]


def test_stop_and_resume_equals_a_straight_run(synth, tmp_path, capsys):
    from detrax.errors import ResumeConflict
    from detrax.models.detr import weight_arrays
    from detrax.weights.checkpoint import load_run

    cfg = _cfg("train.steps=9", "train.ckpt_every=4")  # (dropout's RNG resuming too: test_reliability's)
    fit(cfg, Run(synth, str(tmp_path / "a"), quiet=True))
    first = fit(cfg, Run(synth, str(tmp_path / "b"), quiet=True, stop_after=5))
    assert first["step"] == 5
    with pytest.raises(ResumeConflict, match="already holds a run .*--resume continues it"):
        fit(cfg, Run(synth, str(tmp_path / "b"), quiet=True))  # a new run would overwrite this one
    with pytest.raises(ResumeConflict, match=r"contradicts the run .*\n  train.lr: 0.0005 in the run, 0.001 now"):
        fit(_cfg("train.steps=9", "train.ckpt_every=4", "train.lr=1e-3"),
            Run(synth, str(tmp_path / "b"), quiet=True, resume=True))
    # the CLI without --config resumes with the run's own config; logging more often changes no number
    assert cli.main(["train", "--data", synth, "--workdir", str(tmp_path / "b"), "--resume", "train.log_every=3"]) == 0
    assert capsys.readouterr().err.startswith(f"resuming {tmp_path / 'b'} from its checkpoint of step 5\n")
    straight, resumed = (weight_arrays(load_run(str(tmp_path / d))) for d in "ab")
    for k in straight:
        np.testing.assert_array_equal(np.asarray(straight[k]), np.asarray(resumed[k]), err_msg=k)  # bitwise on CPU


def test_init_from_weights_with_another_class_count(synth, tmp_path, capsys):
    import detrax

    other = override(presets.get("demo"), ["model.num_classes=7"]).model
    from flax import nnx

    detrax.Detector(detrax.DETR(other, rngs=nnx.Rngs(5))).save(tmp_path / "w.safetensors")
    fit(_cfg("train.steps=1"), Run(synth, str(tmp_path / "run"), init=str(tmp_path / "w.safetensors")))
    err = capsys.readouterr().err
    assert "initialised from" in err and "fresh: class_embed/bias, class_embed/kernel" in err


def test_query_groups_start_fresh_from_one_group_weights_and_train(synth, tmp_path, capsys):
    """Group DETR (with the demo's other aids: test_loss_falls's program) from official-layout weights: the extra
    groups start fresh, the loss logs them, and the run serves the plain DETR (the first group)."""
    from flax import nnx

    import detrax

    one = override(presets.get("demo"), ["model.num_classes=4", "model.query_groups=1"]).model
    detrax.Detector(detrax.DETR(one, rngs=nnx.Rngs(5))).save(tmp_path / "w.safetensors")
    fit(_cfg("train.steps=2", *AIDS), Run(synth, str(tmp_path / "run"), init=str(tmp_path / "w.safetensors")))
    fresh = re.search(r"; fresh: (.*)", capsys.readouterr().err)
    assert fresh and "group_queries" in fresh.group(1).split(", ")
    rows = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert len(rows) == 2 and all(r["loss_groups"] > 0 and r["loss"] > r["loss_groups"] for r in rows)
    detector = detrax.load(str(tmp_path / "run"))
    assert detector.model.config.query_groups == 1 and not hasattr(detector.model, "group_queries")
    image = np.full((96, 128, 3), 120, np.uint8)
    assert len(detector.predict([image], threshold=0.0)[0]["scores"]) == one.num_queries


def test_the_class_count_follows_the_data(synth, tmp_path, capsys):
    """model.num_classes=auto (the presets' default): the training data's largest category id + 1, recorded with
    the category names in the checkpoint; an explicit number wins; a resumed run keeps its own."""
    import shutil

    import detrax

    foreign = tmp_path / "foreign"  # the synthetic shapes under other category ids: 5, 17, 90 (COCO's last)
    shutil.copytree(synth, foreign)
    ids = {1: 5, 2: 17, 3: 90}
    for ann in (foreign / "annotations").iterdir():
        coco = json.loads(ann.read_text())
        for c in coco["categories"]:
            c["id"] = ids[c["id"]]
        for a in coco["annotations"]:
            a["category_id"] = ids[a["category_id"]]
        ann.write_text(json.dumps(coco))
    fit(_cfg("train.steps=2"), Run(str(foreign), str(tmp_path / "auto")))
    assert "model.num_classes=91 from the training data (3 categories, ids up to 90)" in capsys.readouterr().err
    detector = detrax.load(str(tmp_path / "auto"))
    assert detector.config.num_classes == 91 and detector.names == {5: "rectangle", 17: "ellipse", 90: "triangle"}
    # on the plain shapes (ids up to 3: auto would be 4), 91 given: the same program as above (and test_tfds's),
    # compiled once
    fit(_cfg("train.steps=2", "model.num_classes=91"), Run(synth, str(tmp_path / "own"), stop_after=1))
    # resumed with the preset's auto: the run keeps its 91 (no conflict), and finishes
    assert cli.main(["train", "--config", "demo", "--data", synth, "--workdir", str(tmp_path / "own"),
                     "--resume", *FAST, "train.steps=2"]) == 0
    assert detrax.load(str(tmp_path / "own")).config.num_classes == 91


@pytest.mark.parametrize("override,message", [
    ("train.batch_sise=4", r"unknown config key 'train.batch_sise'; valid keys here: .*batch_size"),
    ("model.num_classes=2", r"instances_train.json: category ids reach 3; set model.num_classes=4 \(it is 2\), or "
                            "model.num_classes=auto"),
    ("data.max_targets=40", r"data.max_targets=40 exceeds model.num_queries=16"),
    ("train.batch_size=64", r"fewer than one batch of 64"),
])
def test_config_errors_are_clear(synth, tmp_path, capsys, override, message):
    rc = cli.main(["train", "--config", "demo", "--data", synth, "--workdir", str(tmp_path), override])
    assert rc == 2 and re.search(message, capsys.readouterr().err)


def test_eval_cli_equals_pycocotools_on_the_results_file(synth, aided_run, tmp_path, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert cli.main(["eval", str(aided_run), "--data", synth, "--config", "demo", "--out",
                     str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics  # what the CLI printed
    assert set(metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    gt = COCO(f"{synth}/annotations/instances_val.json")
    ev = COCOeval(gt, gt.loadRes(str(tmp_path / "ev" / "results.json")), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert [metrics[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")] == [float(x) for x in ev.stats[:6]]


def test_one_inference_path_same_detections_everywhere(synth, tmp_path, capsys):
    """The evaluation during training (on the live training state), `detrax eval`, `detrax predict` and
    `Detector.predict` see the same image the same way (the run's own val transform, each image on its own
    shape bucket): the same detections, with no size or config flag."""
    import shutil

    import detrax

    run, data = str(tmp_path / "run"), tmp_path / "data"  # the val images of several shapes, the train ones of one
    write_dataset(str(tmp_path / "varied"), num_images=24, seed=3)
    shutil.copytree(synth, data, ignore=shutil.ignore_patterns("val", "instances_val.json"))
    shutil.copytree(tmp_path / "varied" / "val", data / "val")
    shutil.copy(tmp_path / "varied" / "annotations" / "instances_val.json", data / "annotations")
    assert len({Image.open(f).size for f in (data / "val").iterdir()}) > 2
    data = str(data)
    live = fit(_cfg("train.steps=12", "train.lr=1e-3", "data.val_size=112", "data.max_size=160", "data.val_split=val"),
               Run(data, run, quiet=True))["eval"]
    assert cli.main(["eval", run, "--data", data, "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == pytest.approx(live, abs=1e-9)
    assert cli.main(["predict", run, f"{data}/val", "--out", str(tmp_path / "pr"), "--threshold", "0"]) == 0
    capsys.readouterr()
    evaluated = {}  # image id -> [Q] of (score, category, bbox), in query order
    for r in json.loads((tmp_path / "ev" / "results.json").read_text()):
        evaluated.setdefault(r["image_id"], []).append((r["score"], r["category_id"], r["bbox"]))
    files = sorted((Path(data) / "val").iterdir())
    detector = detrax.load(run)
    assert (detector.preprocess.size, detector.preprocess.max_size) == (112, 160)
    dets = detector.predict([str(f) for f in files], threshold=0.0, batch_size=3)
    predicted = {}
    for r in json.loads((tmp_path / "pr" / "results.json").read_text()):
        predicted.setdefault(r["image_id"], []).append(r)
    assert set(evaluated) == set(predicted) == {int(f.stem) for f in files}
    for f, det in zip(files, dets):
        ev = evaluated[int(f.stem)]
        for q, score, label, (x0, y0, x1, y1) in zip(det["queries"], det["scores"], det["labels"], det["boxes"]):
            want_score, want_label, want_box = ev[int(q)]
            assert abs(score - want_score) < 1e-5 and label == want_label
            np.testing.assert_allclose([x0, y0, x1 - x0, y1 - y0], want_box, atol=1e-3)
        cli_rows = predicted[int(f.stem)]
        np.testing.assert_allclose([r["score"] for r in cli_rows], det["scores"], atol=1e-5)
        np.testing.assert_allclose([r["bbox"][:2] for r in cli_rows], det["boxes"][:, :2], atol=1e-2)
    panel = detector.attention(str(files[0]), {k: v[:2] for k, v in dets[0].items()})
    assert panel.height > 0


def test_cpu_compiler_options_leave_the_step_unchanged(monkeypatch):
    """The train step's CPU compile options (LLVM level 1, for compile time; a level in XLA_FLAGS wins) and the
    suite's XLA_FLAGS (level 0, the loop emitters: conftest) give the numbers of XLA's default (level 3, the
    fusion emitters): one trace and lowering of the step, compiled three ways."""
    import jax
    from conftest import LOOP_EMITTERS
    from flax import nnx

    from detrax.criterion.loss import set_loss
    from detrax.models.detr import DETR
    from detrax.training import step as train_step
    from detrax.training.optim import learning_rates, optimizer

    cfg = override(presets.tiny(), ONE_LAYER)  # every kind of op
    rs = np.random.default_rng(0)
    b, m = 2, cfg.data.max_targets
    batch = {"pixels": rs.integers(0, 256, (b, 64, 96, 3)).astype(np.uint8), "mask": np.ones((b, 64, 96), bool),
             "labels": rs.integers(0, cfg.model.num_classes, (b, m)).astype(np.int32),
             "boxes": np.tile(np.array([0.4, 0.5, 0.3, 0.2], np.float32), (b, m, 1)),
             "valid": np.arange(m)[None].repeat(b, 0) < 3}
    model = DETR(cfg.model, rngs=nnx.Rngs(0))
    model.train()
    graphdef, state = nnx.split((model, nnx.Optimizer(model, optimizer(cfg.train), wrt=nnx.Param)))
    loss_fn, rates = (lambda o, t: set_loss(o, t, cfg.loss)), learning_rates(cfg.train, 100, 100)

    assert "xla_backend_optimization_level=0" in os.environ["XLA_FLAGS"] and train_step.compiler_options() is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # read when a step is made
    assert train_step.compiler_options() == ({"xla_backend_optimization_level": 1}
                                             if jax.default_backend() == "cpu" else None)
    given, jit = [], jax.jit  # make_train_step compiles with what it is given (seen where it makes its jit)
    monkeypatch.setattr(train_step, "compiler_options", lambda: {"xla_no_such_option": True})
    with monkeypatch.context() as m:
        m.setattr(jax, "jit", lambda *a, **kw: given.append(kw.get("compiler_options")) or jit(*a, **kw))
        train_step.make_train_step(graphdef, loss_fn, rates)
    assert given == [{"xla_no_such_option": True}]
    monkeypatch.setattr(train_step, "compiler_options", lambda: None)
    lowered = train_step._jitted_step(graphdef, loss_fn, nnx.Param, 0, None).lower(state, batch, 0, rates(0))

    def run(options):
        step, s, losses = lowered.compile(options), jax.tree.map(lambda x: x.copy(), state), []  # it donates
        for i in range(3):
            s, terms = step(s, batch, i, rates(i))
            losses.append(float(terms["loss"]))
        return losses, jax.tree.leaves(nnx.state(nnx.merge(graphdef, s)[0], nnx.Param))

    fusion = {"xla_cpu_use_fusion_emitters": True} if LOOP_EMITTERS in os.environ["XLA_FLAGS"] else {}
    default_losses, default_params = run({"xla_backend_optimization_level": 3, **fusion})
    for name, options in ("level 1", {"xla_backend_optimization_level": 1, **fusion}), ("the suite's", None):
        losses, params = run(options)
        np.testing.assert_allclose(losses, default_losses, rtol=1e-4, err_msg=name)
        for a, p in zip(params, default_params):
            np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=1e-4, atol=1e-5, err_msg=name)
