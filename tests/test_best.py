"""The best weights kept: the weights' moving average (`train.ema_decay`), `train.keep_best`, `train.early_stop`,
and `detrax.load(RUN, weights=best|last|raw)`."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ONE_LAYER

import detrax
from detrax import cli
from detrax.config import presets, schema
from detrax.config.overrides import override
from detrax.data.synthetic import write_dataset
from detrax.models.detr import weight_arrays
from detrax.training import validation
from detrax.training.best import Best
from detrax.training.loop import Run, fit
from detrax.training.optim import optimizer
from detrax.weights.checkpoint import Checkpoints, load_run


def test_the_moving_average_follows_its_recurrence():
    """The optimizer's last link averages the weights that each update makes, at RF-DETR's warmed-up decay
    d_t = decay * (1 - exp(-t / tau)): checked against the recurrence written out in NumPy."""
    decay, tau = 0.9, 3
    tx = optimizer(schema.TrainConfig(ema_decay=decay, ema_tau=tau, clip_max_norm=0.0))
    params = {"backbone": {"w": jnp.array([1.0, -2.0])}, "head": {"b": jnp.array([0.5])}}
    state = tx.init(params)
    rng = np.random.default_rng(0)
    ema = jax.tree.map(np.asarray, params)
    for t in range(1, 6):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, state = tx.update(grads, state, params, lr=jnp.array([0.1, 0.01]))
        params = optax.apply_updates(params, updates)
        d = decay * (1 - math.exp(-t / tau))
        ema = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), ema, params)
    got = state[-1].ema
    for path in (("backbone", "w"), ("head", "b")):
        np.testing.assert_allclose(got[path[0]][path[1]], ema[path[0]][path[1]], rtol=1e-6)
    assert int(state[-1].updates) == 5
    # off (the default): no link, the optimizer state of the official recipe as before
    assert len(optimizer(schema.TrainConfig()).init(params)) == 2


def test_the_best_record_keeps_the_best_and_counts_evaluations_since(tmp_path):
    saved, lines = [], []
    best = Best(str(tmp_path), "AP50", patience=2, say=lines.append)
    save = lambda kind, path: (saved.append((kind, os.path.basename(path))), open(path, "w").close())
    scores = [(4, 0.2, 0.3), (8, 0.5, 0.4), (12, 0.5, 0.5), (16, 0.45, 0.49), (20, 0.1, 0.2)]  # step, raw, ema
    stops = [best.update(s, {"raw": {"AP50": r, "AP": r / 2}, "ema": {"AP50": e}}, save) for s, r, e in scores]
    # 4: ema 0.3; 8: raw 0.5; 12: a tie, not better; 16: worse (2 since: stop); 20: still worse
    assert saved == [("ema", "4-ema.safetensors"), ("raw", "8-raw.safetensors")]
    assert stops == [False, False, False, True, True]
    assert best.record | {"eval": None} == {"metric": "AP50", "value": 0.5, "step": 8, "weights": "raw",
                                            "file": "best/8-raw.safetensors", "eval": None, "since": 3,
                                            "evaluated": 20}
    on_disk = json.loads((tmp_path / "best.json").read_text())
    assert on_disk["file"] == "best/8-raw.safetensors" and on_disk["eval"] == {"AP50": 0.5, "AP": 0.25}
    assert lines[-1] == "step 8: the best AP50 so far, 0.5000 (raw weights): best/8-raw.safetensors"
    # the files no record names go; a kept checkpoint's record keeps its own
    best.prune([{"file": "best/4-ema.safetensors"}])
    assert sorted(os.listdir(tmp_path / "best")) == ["4-ema.safetensors", "8-raw.safetensors"]
    best.prune([])
    assert sorted(os.listdir(tmp_path / "best")) == ["8-raw.safetensors"]
    # resumed with another metric (--allow-changes): a new record from there, said
    other = Best(str(tmp_path), "AP", record=best.record, say=lines.append)
    assert other.record["value"] is None and other.record["evaluated"] == 20 and "by AP50 until step 20" in lines[-1]
    with pytest.raises(ValueError, match=r"keep_best=AP50: the evaluation gives no such number \(it gives PQ\)"):
        Best(str(tmp_path / "b"), "AP50").update(1, {"raw": {"PQ": 0.1}}, save)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """8 training images, 2 a batch: an epoch of 4 steps, an evaluation at every 4th."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=10, seed=5, val_fraction=0.2)
    return str(root)


def _cfg(*extra):
    return override(presets.get("tiny"), [
        *ONE_LAYER, "train.steps=16", "train.batch_size=2", "train.ckpt_every=4", "train.keep=1",
        "train.log_every=1", "train.eval_every=1", "data.workers=0", "model.dropout=0.1", "data.scales=64,80",
        "data.max_size=96", "data.crop_scales=48,64", "data.crop_size=32,48", "data.val_size=64",
        "data.max_targets=8", "data.bucket_step=96", "loss.matcher=hungarian_jax", "train.ema_decay=0.9",
        "train.ema_tau=2", "train.keep_best=AP50", "train.early_stop=2", *extra])


def _everything(workdir) -> dict:
    """The trained weights, their average, the best record of the last checkpoint, best.json and best/'s files."""
    ckpts = Checkpoints(str(workdir), read_only=True)
    record = ckpts.meta(ckpts.latest_step())["best"]
    ckpts.close()
    out = {f"{kind}/{k}": np.asarray(v) for kind in ("raw", "ema")
           for k, v in weight_arrays(load_run(str(workdir), ema=kind == "ema")).items()}
    return out | {"record": record, "best.json": (workdir / "best.json").read_text(),
                  "files": sorted(os.listdir(workdir / "best")),
                  "evals": [(r["step"], r["kind"], r["AP50"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))
                            if r["kind"].startswith("eval")]}


def test_killed_between_a_checkpoint_and_its_evaluation_a_run_resumes_exactly(synth, tmp_path, monkeypatch):
    """A checkpoint is written before its step's evaluation. A run that dies after that evaluation (which may have
    written a best file the checkpoint does not know of) evaluates the step again on resuming: the best record,
    the early stop, best.json, best/'s files, the logged evaluations, the weights and their average equal a run
    straight through. Without the evaluation again, the record would count one evaluation fewer and the run
    would not stop at step 12."""
    straight = fit(_cfg(), Run(synth, str(tmp_path / "straight")))
    assert straight["early_stopped"] and straight["step"] == 12  # evaluations at 4 (best), 8, 12: 2 since
    assert straight["best"]["since"] == 2 and straight["eval_ema"] is not None

    call = validation.Validation.__call__

    def dies_after_evaluating(self, done, state, terms=None):
        call(self, done, state, terms)
        if done == 8:
            raise SystemExit("killed")

    monkeypatch.setattr(validation.Validation, "__call__", dies_after_evaluating)
    with pytest.raises(SystemExit):
        fit(_cfg(), Run(synth, str(tmp_path / "killed")))
    monkeypatch.setattr(validation.Validation, "__call__", call)
    resumed = fit(_cfg(), Run(synth, str(tmp_path / "killed"), resume=True))
    assert resumed["early_stopped"] and resumed["step"] == 12
    a, b = _everything(tmp_path / "straight"), _everything(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert a[k] == b[k], k
    # resumed again, the stopped run trains nothing
    again = fit(_cfg(), Run(synth, str(tmp_path / "killed"), resume=True, quiet=True))
    assert again["early_stopped"] and again["step"] == 12

    # the weights a run offers: best (the file best.json names), last (the average), raw
    run = str(tmp_path / "straight")
    best = json.loads(a["best.json"])
    loaded = {w: weight_arrays(detrax.load(run, weights=w).model) for w in ("auto", "best", "last", "raw")}
    from_file = weight_arrays(detrax.load(os.path.join(run, best["file"])).model)
    for k in from_file:
        np.testing.assert_array_equal(loaded["best"][k], from_file[k], err_msg=k)
        np.testing.assert_array_equal(loaded["auto"][k], from_file[k], err_msg=k)
        np.testing.assert_array_equal(loaded["last"][k], a[f"ema/{k}"], err_msg=k)
        np.testing.assert_array_equal(loaded["raw"][k], a[f"raw/{k}"], err_msg=k)
    assert best["step"] == 4 and best["file"] == f"best/4-{best['weights']}.safetensors"


def test_the_command_line_picks_weights_and_refuses_what_cannot_be(synth, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"train.keep_best=AP77: evaluating detection gives AP, AP50"):
        fit(_cfg("train.keep_best=AP77"), Run(synth, str(tmp_path / "a"), quiet=True))
    with pytest.raises(ValueError, match=r"train.early_stop=3: it counts evaluations without a new best"):
        fit(_cfg("train.keep_best=", "train.early_stop=3"), Run(synth, str(tmp_path / "a"), quiet=True))
    with pytest.raises(ValueError, match=r"keep_best=AP50 keeps the best evaluated weights: the data has no val"):
        fit(_cfg("data.val_split=none"), Run(synth, str(tmp_path / "b"), quiet=True))
    fit(_cfg("train.steps=4", "train.keep_best=", "train.early_stop=0"), Run(synth, str(tmp_path / "c"), quiet=True))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "c"), "--data", synth, "--weights", "best"]) == 2
    assert "the run kept no best weights (train with train.keep_best=AP50" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "c"), "--data", synth, "--weights", "raw"]) == 0
    raw = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main(["eval", str(tmp_path / "c"), "--data", synth]) == 0  # auto: no best, the last: the average
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]).keys() == raw.keys()
