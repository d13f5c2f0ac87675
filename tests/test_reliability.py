"""Reliability: SIGKILL at random moments, SIGTERM / Ctrl-C, non-finite steps, checkpoint write failures, an
unwritable workdir. Every interrupted run, resumed, ends bitwise equal to a run straight through."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import ONE_LAYER, xla_flags
from digests import params_digest

from detrax import cli
from detrax.config import presets
from detrax.config.overrides import override
from detrax.data.loader import Loader
from detrax.data.synthetic import write_dataset
from detrax.errors import BadSteps, CheckpointWriteError
from detrax.models.detr import weight_arrays
from detrax.training import loop as train_mod
from detrax.training.loop import Run, fit
from detrax.weights.checkpoint import Checkpoints, load_run

KILLABLE = Path(__file__).parent / "scripts" / "killable.py"
STEPS = 12
FAST = ["train.log_every=1", "train.eval_every=0", "model.dropout=0.1", "data.workers=0",
        "loss.matcher=hungarian_jax"]  # no host callback: the compilation cache (conftest) serves repeated runs


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=24, seed=3)
    return str(root)


def _env():
    """The suite's environment (its compilation cache: `conftest.compilation_cache`) on one CPU device."""
    return {**os.environ, "XLA_FLAGS": xla_flags(1)}


def _train_args(synth, workdir, steps, *extra) -> list[str]:
    """`detrax train --resume` of a tiny DETR (one encoder and one decoder layer: a cheaper step to compile and
    trace): one batch shape and an on-device matcher (no host callback), so that JAX's persistent compilation
    cache spares every relaunch its compile; no evaluation."""
    return ["train", "--config", "tiny", "--data", synth, "--workdir", str(workdir), "--resume",
            *ONE_LAYER,
            f"train.steps={steps}", "train.batch_size=2", "train.ckpt_every=2", "train.keep=2", "train.log_every=1",
            "train.eval_every=0", "data.workers=0", "model.dropout=0.1", "data.scales=64,80", "data.max_size=96",
            "data.crop_scales=48,64", "data.crop_size=32,48", "data.val_size=64", "data.max_targets=8",
            "data.bucket_step=96", "data.val_split=none", "loss.matcher=hungarian_jax",
            "train.ema_decay=0.9", "train.ema_tau=2", *extra]  # the weights' moving average resumes exactly too


def _child(synth, workdir, steps, *extra, kill=None):
    """The training run in a process of its own (`scripts/killable.py`), which kills itself at `kill`."""
    return subprocess.Popen([sys.executable, str(KILLABLE), *([f"kill={kill}"] if kill else []),
                             *_train_args(synth, workdir, steps, *extra)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _here(capsys, synth, workdir, steps, *extra) -> tuple[str, str]:
    """The same run in the test's own process, for a launch that is not interrupted: the same program as the
    children's (the suite's XLA flags), traced and compiled once per worker, where a child pays ~15 s of CPU to
    import, trace and build. Returns its stdout and stderr."""
    capsys.readouterr()
    status = cli.main(_train_args(synth, workdir, steps, *extra))
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    return out, err


def _committed(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _weights(workdir):
    """The trained weights, and their moving average where the run keeps one (`train.ema_decay`)."""
    model, meta = load_run(str(workdir), with_meta=True)
    raw = {k: np.asarray(v) for k, v in weight_arrays(model).items()}
    if not meta["config"]["train"]["ema_decay"]:
        return raw
    ema = {f"ema/{k}": np.asarray(v) for k, v in weight_arrays(load_run(str(workdir), ema=True)).items()}
    assert any(not np.array_equal(raw[k], ema[f"ema/{k}"]) for k in raw)  # two things to compare
    return raw | ema


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _last_logged(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _check_after_kill(workdir):
    """No half-written checkpoint is visible, and every committed one restores with its loader state."""
    if not (workdir / "checkpoints").is_dir():
        return
    assert not [n for n in os.listdir(workdir / "checkpoints") if not n.isdigit() and "tmp" not in n], \
        os.listdir(workdir / "checkpoints")
    for step in _committed(workdir):
        ckpt = Checkpoints(str(workdir))
        meta = ckpt.meta(step)
        ckpt.close()
        assert meta["step"] == step
        assert (workdir / "data_state" / f"{step}.0.json").is_file()


def _through_kills(capsys, synth, workdir, steps, kills, first=(), extra=(), seed=0):
    """Run the killable child through `kills`: `random` (SIGKILL from outside at a random moment, after some
    progress, often mid-checkpoint) or a kill point of the child's own (`step:K`, `commit:N`, `end`), then to the
    end (in the test's own process: `_here`). `first` are arguments of the first launch only (the relaunches
    resume with the plain command). Returns the last launch's stdout and every launch's stderr."""
    rng, errs = np.random.default_rng(seed), []
    for i, when in enumerate(kills):
        args = (*(first if i == 0 else ()), *extra)
        if when == "random":
            start = _last_logged(workdir)
            p = _child(synth, workdir, steps, *args)
            deadline = time.time() + 300
            while p.poll() is None and _last_logged(workdir) <= start and time.time() < deadline:
                time.sleep(0.01)  # wait for progress, then kill at a random moment
            time.sleep(rng.uniform(0, 0.5))
            fired = p.poll() is None
            if fired:
                p.send_signal(signal.SIGKILL)
            errs.append(p.communicate(timeout=60)[1])
            assert fired and p.returncode == -signal.SIGKILL, \
                f"random kill {i} never fired: the run ended first (status {p.returncode}): {errs[-1][-2000:]}"
        else:
            p = _child(synth, workdir, steps, *args, kill=when)
            errs.append(p.communicate(timeout=600)[1])
            assert p.returncode == -signal.SIGKILL, f"kill point {when} not reached (status {p.returncode}): " \
                                                    f"{errs[-1][-2000:]}"
        _check_after_kill(workdir)
    out, err = _here(capsys, synth, workdir, steps, *(first if not kills else ()), *extra)
    return out, [*errs, err]


@pytest.fixture(scope="module")
def straight(synth, tmp_path_factory, compilation_cache):  # the cache set in os.environ first
    """The reference: the same run straight through, in the test's own process. The children share the suite's
    compilation cache: this run (the same program) fills it for them."""
    root = tmp_path_factory.mktemp("straight")
    assert cli.main(_train_args(synth, root / "run", STEPS)) == 0
    return {"weights": _weights(root / "run"), "workdir": str(root / "run")}


def test_sigkill_five_times_then_resume_equals_a_straight_run(synth, straight, tmp_path, capsys):
    """Before the first checkpoint, inside its write, at random moments, after the last one."""
    workdir = tmp_path / "run"
    out, errs = _through_kills(capsys, synth, workdir, STEPS, ["step:1", "commit:2", "random", "random", "end"])
    assert json.loads(out.strip().splitlines()[-1])["step"] == STEPS
    assert errs[-1].startswith(f"resuming {workdir} from its checkpoint of step {STEPS}\n")  # killed after the last
    _assert_same(_weights(workdir), straight["weights"])


def test_reading_a_live_run_harms_nothing(synth, straight, tmp_path, capsys):
    """While a run trains in its own process, this one loads it, predicts and evaluates with it in a loop: every
    checkpoint the run wrote is intact, it ends bitwise equal to a run with no reader, and the reader wrote
    nothing (a checkpoint being written, `*.orbax-checkpoint-tmp-*`, is what a reader that cleans would delete)."""
    import detrax

    workdir = tmp_path / "run"
    image = str(sorted((Path(synth) / "val").iterdir())[0])

    def read(run):
        detector = detrax.load(run)
        assert len(detector.predict([image], threshold=0.0)[0]["scores"]) == detector.config.num_queries
        assert cli.main(["eval", run, "--data", synth, "--split", "val"]) == 0  # its own transform, the val split

    read(straight["workdir"])  # compiled once before the race: the loop's reads are quick
    trainer = _child(synth, workdir, STEPS, "train.keep=100")
    reads = 0
    while trainer.poll() is None:
        if _committed(workdir):
            read(str(workdir))
            reads += 1
        else:
            time.sleep(0.05)
    assert trainer.communicate(timeout=60) and trainer.returncode == 0, trainer.stderr
    assert reads >= 2, reads
    assert _committed(workdir) == list(range(2, STEPS + 1, 2))  # none lost: keep=100
    _check_after_kill(workdir)
    _assert_same(_weights(workdir), straight["weights"])
    # a checkpoint in progress is left alone; a folder that is not a run gets one line and nothing written into it
    in_progress = workdir / "checkpoints" / f"{STEPS + 2}.orbax-checkpoint-tmp-123"
    in_progress.mkdir()
    detrax.load(str(workdir))
    assert in_progress.is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert cli.main(["predict", str(empty), image, "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"detrax: error: {empty}: not a detrax run (no checkpoints/ folder in it) " \
                                      "nor a weights file\n"
    assert not list(empty.iterdir())


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    from flax import nnx

    import detrax

    path = tmp_path_factory.mktemp("init") / "start.safetensors"
    model = override(presets.get("tiny"), ONE_LAYER).model  # as _train_args
    detrax.Detector(detrax.DETR(model, rngs=nnx.Rngs(7))).save(path)
    return str(path)


@pytest.mark.parametrize("mode", ["init", "calibrate"])
def test_killed_before_its_first_checkpoint_a_run_restarts_as_it_began(synth, straight, init_weights, tmp_path,
                                                                       capsys, mode):
    """--init weights (given to the first launch only: the relaunches take them from the run's record) or
    calibrated batch norm: killed before the first checkpoint, the resumed run ends bitwise equal to one straight
    through (here, in the test's own process: the same program). (Kills inside a checkpoint's write and after the
    last are `test_sigkill_five_times...`'s: a run restored from a checkpoint reads neither --init nor the
    calibration.)"""
    steps = 4
    first, extra = (["--init", init_weights], []) if mode == "init" else ([], ["train.calibrate_bn=true"])
    ref = tmp_path / "straight"
    assert cli.main(_train_args(synth, ref, steps, *first, *extra)) == 0
    err = capsys.readouterr().err
    assert err.splitlines()[0] == f"--resume: no checkpoint and no run recorded in {ref}: a new run"
    assert err.splitlines()[1].startswith(f"initialised from {init_weights} (weights sha256 " if mode == "init"
                                          else "frozen batch norm calibrated on 8 images")
    workdir = tmp_path / "run"
    _, errs = _through_kills(capsys, synth, workdir, steps, ["step:1"], first, extra, seed=1)
    _assert_same(_weights(workdir), _weights(ref))
    # the relaunch after the first kill had no checkpoint: it says so first, and starts as the run began
    restart = f"--resume: no checkpoint in {workdir} yet: the run starts again from the beginning, exactly as " \
              "recorded in run.json"
    assert errs[1].splitlines()[0] == restart + (f" (from {init_weights})" if mode == "init" else
                                                 " (from its seed, batch norm calibrated)")
    assert errs[1].splitlines()[1] == err.splitlines()[1]
    record = json.loads((workdir / "run.json").read_text())
    if mode == "init":
        assert record["init"]["path"] == init_weights and len(record["init"]["weights_sha256"]) == 64
        assert record["calibration"] is None
    else:
        assert record["init"] is None and record["calibration"] == {"images": 8}
    ckpts = Checkpoints(str(workdir))
    assert ckpts.meta(steps)["start"] == record  # the record travels with every checkpoint
    ckpts.close()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, steps + 1))  # rewound, not doubled
    assert rows[0]["kind"] == "start" and rows[0]["record"] == record
    assert {r["kind"] for r in rows[1:] if r["kind"] not in ("train", "eval")} <= {"resume"}


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_save_and_exit_cleanly(synth, straight, tmp_path, capsys, sig, status):
    workdir = tmp_path / "run"
    p = _child(synth, workdir, STEPS)
    deadline = time.time() + 300
    while _last_logged(workdir) < 3 and time.time() < deadline and p.poll() is None:  # then mid-run
        time.sleep(0.01)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == status, err[-2000:]
    assert "Traceback" not in err
    stopped = json.loads(out.strip().splitlines()[-1])
    assert stopped["stopped"] == sig.name and 3 <= stopped["step"] < STEPS
    assert f"{sig.name}: stopped at step {stopped['step']}, checkpoint saved" in err
    assert _committed(workdir)[-1] == stopped["step"]
    if sig != signal.SIGTERM:
        return  # the checkpoint a signal saves is the same whichever signal it was: SIGTERM's resumes below
    _here(capsys, synth, workdir, STEPS)  # resume to the end
    _assert_same(_weights(workdir), straight["weights"])


def _cfg(*overrides):
    return override(presets.get("tiny"), FAST + ["train.batch_size=2", "data.max_targets=8",
                                                         "data.scales=64,80", "data.max_size=96",
                                                         "data.crop_scales=48,64", "data.crop_size=32,48",
                                                         "data.bucket_step=96"] + list(overrides))


class _PoisonLoader(Loader):
    """Batches from `first` (1-based step) to `last` carry NaN boxes: their loss is not finite."""

    first, last = 0, 0

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.count = 0

    def __next__(self):
        batch = dict(super().__next__())
        self.count += 1
        if self.first <= self.count <= self.last:
            batch["boxes"] = np.full_like(batch["boxes"], np.nan)
        return batch


def test_a_non_finite_step_is_skipped_and_counted(synth, tmp_path, monkeypatch):
    monkeypatch.setattr(_PoisonLoader, "first", 3)
    monkeypatch.setattr(_PoisonLoader, "last", 3)
    monkeypatch.setattr(train_mod, "Loader", _PoisonLoader)
    summary = fit(_cfg("train.steps=5"), Run(synth, str(tmp_path / "a"), quiet=False))
    rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == [0, 0, 1, 0, 0]
    # the learning rate drops at step 4 of 5 (lr_drop 200 of 300 epochs) although step 3 was skipped
    assert [r["lr"] for r in rows if r["kind"] == "train"] == pytest.approx([1e-4] * 3 + [1e-5] * 2)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(summary["params"]))


def test_k_bad_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_PoisonLoader, "first", 5)
    monkeypatch.setattr(_PoisonLoader, "last", 100)
    monkeypatch.setattr(train_mod, "Loader", _PoisonLoader)
    cfg = _cfg("train.steps=20", "train.ckpt_every=2", "train.max_bad_steps=3")
    with pytest.raises(BadSteps, match=r"steps 5\.\.7: the loss or gradient was not finite 3 times in a row .*"
                                       r"The last good checkpoint, step 6, is kept"):
        fit(cfg, Run(synth, str(tmp_path / "bad"), quiet=False))
    assert _committed(tmp_path / "bad") == [2, 4, 6]  # step 6 holds step 4's weights: 5 and 6 were skipped
    monkeypatch.setattr(train_mod, "Loader", Loader)  # the real loader again
    fit(_cfg("train.steps=20", "train.ckpt_every=2"), Run(synth, str(tmp_path / "good"), quiet=True, stop_after=4))
    _assert_same(_weights(tmp_path / "bad"), _weights(tmp_path / "good"))


def test_the_finiteness_watch_reads_a_step_only_once_the_next_is_queued():
    """WatchFinite never waits on the step just dispatched (the host would idle the device while it loads the next
    batch): it reads step k's flag at step k + 1, and `finish` reads the last; the counting is unchanged."""
    from detrax.training.actions import WatchFinite

    read, lines = [], []

    class Flag:
        def __init__(self, step, value):
            self.step, self.value = step, value

        def __array__(self, dtype=None, copy=None):
            read.append(self.step)
            return np.asarray(self.value, dtype)

    class Ckpts:
        directory = "ckpts"

        def latest_step(self):
            return 2

    watch = WatchFinite(2, lines.append, Ckpts())
    for step, bad in [(1, 0), (2, 1)]:
        watch(step, None, {"skipped": Flag(step, bad)})
    assert read == [1] and lines == []
    watch.finish()
    assert read == [1, 2] and lines == ["step 2: loss or gradient not finite; step skipped (1 in a row)"]
    watch(3, None, {"skipped": Flag(3, 1)})
    with pytest.raises(BadSteps, match=r"steps 2\.\.3: .* 2 times in a row .*step 2, is kept in ckpts"):
        watch.finish()


def test_a_failed_checkpoint_write_is_a_clear_error_and_the_previous_one_is_intact(synth, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.save

    def full_disk(self, step, *a, **k):
        if step == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, step, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    cfg = _cfg("train.steps=6", "train.ckpt_every=2")
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 4 could not be written .*No space left on "
                                                   r"device.*The previous checkpoint \(step 2\) is intact"):
        fit(cfg, Run(synth, str(tmp_path / "a"), quiet=True))
    assert _committed(tmp_path / "a") == [2]
    assert sorted(os.listdir(tmp_path / "a" / "data_state")) == ["2.0.json"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    resumed = fit(cfg, Run(synth, str(tmp_path / "a"), quiet=True, resume=True))
    straight = fit(cfg, Run(synth, str(tmp_path / "b"), quiet=True))
    assert resumed["step"] == 6 and params_digest(resumed["params"]) == params_digest(straight["params"])


def test_unwritable_workdir_fails_before_any_work(synth, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    status = cli.main(["train", "--config", "tiny", "--data", synth, "--workdir", str(blocker / "run")])
    err = capsys.readouterr().err
    assert status == 1 and "the workdir cannot be written" in err and "nothing was started" in err
