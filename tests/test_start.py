"""How a run begins (detrax.training.start): fresh or restored, decided in one place; a resumed command line that
contradicts the run is refused, naming the difference; the start record."""

import shutil

import pytest
from flax import nnx

import detrax
from detrax.config import presets, schema
from detrax.config.overrides import override
from detrax.errors import ResumeConflict
from detrax.training import start
from detrax.weights import files as weights_io
from detrax.weights.opener import read_init


def read_init_arrays(path):
    return read_init(path)[0]

DATA = {"path": "/data/shapes", "split": "train", "images": 24}


class FakeCheckpoints:
    """What `plan` asks of a workdir's checkpoints."""

    directory = "/w/checkpoints"

    def __init__(self, metas=None):
        self.metas = metas or {}

    def latest_step(self):
        return max(self.metas, default=None)

    def meta(self, step):
        return self.metas[step]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two tiny detectors' weight files, and a copy of the first under another name."""
    root = tmp_path_factory.mktemp("weights")
    model = presets.get("tiny").model
    for name, seed in (("a", 1), ("b", 2), ("a_copy", 1)):
        detrax.Detector(detrax.DETR(model, rngs=nnx.Rngs(seed))).save(root / f"{name}.safetensors")
    return {k: str(root / f"{k}.safetensors") for k in ("a", "b", "a_copy")}


def _cfg(*overrides):
    return override(presets.get("tiny"), list(overrides))


def _recorded(workdir, cfg, init=None):
    """The record a fresh start of `cfg` (from `init`) leaves in `workdir`, as `fit` writes it."""
    s = start.plan(cfg, str(workdir), False, init, DATA, FakeCheckpoints())
    if init:
        s.record["init"]["weights_sha256"] = weights_io.digest(read_init_arrays(init))
    start.write_record(str(workdir), s.record)
    return s.record


def test_a_new_run_and_a_resume_with_nothing_recorded_start_fresh(tmp_path):
    s = start.plan(_cfg(), str(tmp_path), False, None, DATA, FakeCheckpoints())
    assert s.restore is None and s.message == f"a new run in {tmp_path}" and s.record["init"] is None
    s = start.plan(_cfg(), str(tmp_path), True, None, DATA, FakeCheckpoints())
    assert s.restore is None and s.message.startswith("--resume: no checkpoint and no run recorded")


def test_a_workdir_with_a_checkpoint_is_resumed_never_restarted(tmp_path):
    ckpts = FakeCheckpoints({4: {"step": 4, "config": schema.to_dict(_cfg())}})
    with pytest.raises(ResumeConflict, match=r"already holds a run \(checkpoint of step 4 .*--resume continues it"):
        start.plan(_cfg(), str(tmp_path), False, None, DATA, ckpts)
    s = start.plan(_cfg(), str(tmp_path), True, None, DATA, ckpts)
    assert s.restore == 4 and s.message == f"resuming {tmp_path} from its checkpoint of step 4"


def test_resume_without_a_checkpoint_restarts_the_recorded_run_with_its_init(tmp_path, weights):
    record = _recorded(tmp_path, _cfg(), weights["a"])
    s = start.plan(_cfg(), str(tmp_path), True, None, DATA, FakeCheckpoints())  # no --init on the command line
    assert s.restore is None and s.record["init"] == {"path": weights["a"]}
    assert s.expect_init == record["init"]["weights_sha256"]
    assert "exactly as recorded in run.json (from " + weights["a"] in s.message
    model = detrax.DETR(_cfg().model, rngs=nnx.Rngs(0))
    notes = start.initialise(model, s, [], _cfg())
    assert s.record["init"]["weights_sha256"] == record["init"]["weights_sha256"]
    assert notes[0].startswith(f"initialised from {weights['a']}")
    assert weights_io.digest(read_init_arrays(weights["a"])) == weights_io.digest(
        {k: v for k, v in detrax.models.detr.weight_arrays(model).items()})
    # the same weights under another name are the same start
    s = start.plan(_cfg(), str(tmp_path), True, weights["a_copy"], DATA, FakeCheckpoints())
    assert s.record["init"] == {"path": weights["a_copy"]} and not s.changes


def test_other_init_weights_are_refused_naming_both(tmp_path, weights):
    record = _recorded(tmp_path, _cfg(), weights["a"])
    digest = record["init"]["weights_sha256"]
    with pytest.raises(ResumeConflict, match=rf"--init {weights['b']} \(weights sha256 [0-9a-f]{{12}}\): the run "
                                             rf"started from {weights['a']} \(weights sha256 {digest[:12]}\)"):
        start.plan(_cfg(), str(tmp_path), True, weights["b"], DATA, FakeCheckpoints())
    s = start.plan(_cfg(), str(tmp_path), True, weights["b"], DATA, FakeCheckpoints(), allow_changes=True)
    assert s.record["init"] == {"path": weights["b"]} and len(s.changes) == 1


def test_recorded_init_weights_that_changed_on_disk_are_refused(tmp_path, weights):
    path = str(tmp_path / "start.safetensors")
    shutil.copy(weights["a"], path)
    _recorded(tmp_path, _cfg(), path)
    shutil.copy(weights["b"], path)  # overwritten after the run started
    s = start.plan(_cfg(), str(tmp_path), True, None, DATA, FakeCheckpoints())
    model = detrax.DETR(_cfg().model, rngs=nnx.Rngs(0))
    with pytest.raises(ResumeConflict, match=rf"{path} now holds other weights .* than the run started from"):
        start.initialise(model, s, [], _cfg())


def test_init_on_resuming_a_run_that_started_without_is_refused(tmp_path, weights):
    ckpts = FakeCheckpoints({2: {"step": 2, "config": schema.to_dict(_cfg()),
                                 "start": {"config": schema.to_dict(_cfg()), "init": None, "calibration": None,
                                           "data": DATA}}})
    with pytest.raises(ResumeConflict, match=rf"--init {weights['a']}: the run started without --init"):
        start.plan(_cfg(), str(tmp_path), True, weights["a"], DATA, ckpts)


def test_config_changes_are_refused_bookkeeping_is_free(tmp_path):
    ckpts = FakeCheckpoints({2: {"step": 2, "config": schema.to_dict(_cfg())}})  # before start records
    with pytest.raises(ResumeConflict, match=r"checkpoint 2:\n  model.num_queries: 10 in the run, 12 now\n  "
                                             r"train.lr: 0.0001 in the run, 0.001 now\nrun the same command"):
        start.plan(_cfg("train.lr=1e-3", "model.num_queries=12"), str(tmp_path), True, None, DATA, ckpts)
    free = _cfg("train.log_every=7", "train.eval_every=3", "train.ckpt_every=9", "train.keep=1", "data.workers=2",
                "train.max_bad_steps=2")
    assert start.plan(free, str(tmp_path), True, None, DATA, ckpts).changes == []
    s = start.plan(_cfg("train.lr=1e-3"), str(tmp_path), True, None, DATA, ckpts, allow_changes=True)
    assert s.restore == 2 and s.changes == ["train.lr: 0.0001 in the run, 0.001 now"]


def test_a_run_recorded_by_another_version_names_the_setting_this_one_lacks(tmp_path):
    old = schema.to_dict(_cfg())
    old["model"]["position_cycles"] = 1.0  # a setting this version has not
    del old["model"]["encoder_head"]  # one that came later: its default
    ckpts = FakeCheckpoints({2: {"step": 2, "config": old}})
    gone = "model.position_cycles: recorded by another version of detrax, which had this setting; this one has not"
    with pytest.raises(ResumeConflict, match=rf"checkpoint 2:\n  {gone}\nrun the same command"):
        start.plan(_cfg(), str(tmp_path), True, None, DATA, ckpts)
    s = start.plan(_cfg("train.lr=1e-3"), str(tmp_path), True, None, DATA, ckpts, allow_changes=True)
    assert s.restore == 2 and s.changes == ["train.lr: 0.0001 in the run, 0.001 now", gone]


def test_other_training_data_is_refused(tmp_path):
    _recorded(tmp_path, _cfg())
    with pytest.raises(ResumeConflict, match=r"training data: split 'train' of 30 images in /data/other; the run "
                                             r"trained on split 'train' of 24 images in /data/shapes"):
        start.plan(_cfg(), str(tmp_path), True, None, {**DATA, "path": "/data/other", "images": 30},
                   FakeCheckpoints())
    moved = start.plan(_cfg(), str(tmp_path), True, None, {**DATA, "path": "/mnt/shapes"}, FakeCheckpoints())
    assert moved.changes == []  # the same split moved elsewhere


def test_an_unreadable_record_is_a_clear_error(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(ResumeConflict, match=r"run.json: the run's start record cannot be read"):
        start.plan(_cfg(), str(tmp_path), True, None, DATA, FakeCheckpoints())
