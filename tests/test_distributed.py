"""Data parallel: 4 forced CPU devices equal 1 device; two processes on localhost end with identical weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from detrax.data.synthetic import write_dataset

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_dataset(str(root), num_images=16, seed=4)
    return str(root)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(extra)
    return env


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_four_devices_equal_one_device(synth):
    out = subprocess.run([sys.executable, str(SCRIPTS / "sharded_step.py"), synth], capture_output=True, text=True,
                         timeout=600, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert out.returncode == 0, out.stderr[-3000:]
    r = _last_json(out.stdout)
    assert r["shards"] == 4 and r["leaves"] > 50
    assert r["loss4"] == pytest.approx(r["loss1"], rel=1e-6)
    assert r["grad_max_abs_diff"] <= 1e-5 * max(1.0, r["grad_max_abs"])


def test_two_processes_train_to_identical_weights(synth, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "two_process.py"), str(i), str(port), synth,
                               str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env()) for i in range(2)]
    outs = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=600)
        finally:
            for q in procs:
                if q.poll() is None and p.returncode is None:
                    q.kill()
        assert p.returncode == 0, stderr[-3000:]
        outs.append(_last_json(stdout))
    assert [o["process"] for o in outs] == [0, 1] and all(o["processes"] == 2 and o["devices"] == 2 for o in outs)
    assert outs[0]["digest"] == outs[1]["digest"]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
