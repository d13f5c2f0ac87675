"""Data parallel: 4 forced CPU devices equal 1 device; two processes on localhost, each reading its own shard, end
with identical weights; a signal to one stops both, and they resume exactly."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import xla_flags

from detrax.data.synthetic import write_dataset

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=16, seed=4)
    return str(root)


def _env(**extra):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    env.update(extra)
    return env


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_four_devices_equal_one_device(synth):
    out = subprocess.run([sys.executable, str(SCRIPTS / "sharded_step.py"), synth], capture_output=True, text=True,
                         timeout=600, env=_env(XLA_FLAGS=xla_flags(4)))
    assert out.returncode == 0, out.stderr[-3000:]
    r = _last_json(out.stdout)
    assert r["shards"] == 4 and r["leaves"] > 50
    assert r["loss4"] == pytest.approx(r["loss1"], rel=1e-6)
    assert r["grad_max_abs_diff"] <= 1e-5 * max(1.0, r["grad_max_abs"])


def _pair(synth, workdir, steps, cache, resume=False):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return [subprocess.Popen([sys.executable, str(SCRIPTS / "two_process.py"), str(i), str(port), synth,
                              str(workdir), str(steps), *(["resume"] if resume else [])], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]


def _wait(procs, status=0):
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        finally:
            for q in procs:
                if q.poll() is None and p.returncode is None:
                    q.kill()
        assert p.returncode == status, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        outs.append(_last_json(stdout))
    return outs


STEPS = 6


@pytest.fixture(scope="module")
def straight_pair(synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return {"outs": _wait(_pair(synth, root / "run", STEPS, root / "cache")), "cache": root / "cache",
            "workdir": root / "run"}


def test_two_processes_train_to_identical_weights(straight_pair):
    """Each process reads its own half of the data, and both end with the same weights: every step's gradient is
    the whole global batch's (were it each host's own, different data would give different weights)."""
    outs = straight_pair["outs"]
    assert [o["process"] for o in outs] == [0, 1] and all(o["processes"] == 2 and o["devices"] == 2 for o in outs)
    assert len(outs[0]["images"]) == len(outs[1]["images"]) >= STEPS * 2  # 2 of the global batch of 4 a step
    assert set(outs[0]["images"]).isdisjoint(outs[1]["images"]), "the hosts read the same images"
    assert outs[0]["digest"] == outs[1]["digest"]
    assert (straight_pair["workdir"] / "checkpoints" / str(STEPS)).is_dir()
    assert not any(o["torch"] for o in outs), "a training run imported PyTorch (reporting._summary_writer)"


def test_a_signal_to_one_host_stops_both_at_one_step_and_they_resume_exactly(synth, straight_pair, tmp_path):
    workdir = tmp_path / "run"
    procs = _pair(synth, workdir, STEPS, straight_pair["cache"])
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "2").is_dir() and time.time() < deadline and procs[1].poll() is None:
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # process 1 only, as when a scheduler preempts one host
    stopped = _wait(procs, status=143)
    assert [o["stopped"] for o in stopped] == ["SIGTERM", "SIGTERM"]
    assert stopped[0]["step"] == stopped[1]["step"] < STEPS
    assert (workdir / "checkpoints" / str(stopped[0]["step"])).is_dir()
    resumed = _wait(_pair(synth, workdir, STEPS, straight_pair["cache"], resume=True))
    assert [o["step"] for o in resumed] == [STEPS, STEPS]
    assert resumed[0]["digest"] == resumed[1]["digest"] == straight_pair["outs"][0]["digest"]
