"""`detrax train --resume` of a tiny DETR, for the kill and signal tests (tests/test_reliability.py):
argv = data_dir workdir steps [key=value ...] [--init PATH] [kill=WHEN]. One batch shape and an on-device matcher,
so that JAX's persistent compilation cache spares every relaunch its compile; no evaluation.

kill=WHEN makes the process SIGKILL itself at a chosen moment (the tests also kill it from outside at random
ones): `step:K` when the loop has done step K, `commit:N` inside the write of checkpoint N (everything written,
before orbax's atomic rename commits it), `end` after the last checkpoint, before the final evaluation. A kill
point that is never reached lets the run end normally, which the tests see (they expect a SIGKILL)."""

import os
import signal
import sys

from detrax import cli


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(when: str, steps: int) -> None:
    kind, _, arg = when.partition(":")
    if kind == "step":
        from detrax.training.reporting import Reporter

        progress = Reporter.progress

        def patched(self, step):
            progress(self, step)
            if step == int(arg):
                _kill()

        Reporter.progress = patched
    elif kind == "commit":
        from orbax.checkpoint._src.path import async_path

        rename = async_path.rename

        async def patched(src, dst, *a, **k):
            if os.path.basename(str(dst)) == arg:
                _kill()
            return await rename(src, dst, *a, **k)

        async_path.rename = patched
    elif kind == "end":
        from detrax.weights.checkpoint import Checkpoints

        save = Checkpoints.save

        def patched(self, step, *a, **k):
            save(self, step, *a, **k)
            if step == steps:
                _kill()

        Checkpoints.save = patched
    else:
        raise SystemExit(f"unknown kill point {when!r}")


if __name__ == "__main__":
    data, workdir, steps, *extra = sys.argv[1:]
    for item in [e for e in extra if e.startswith("kill=")]:
        extra.remove(item)
        arm(item.split("=", 1)[1], int(steps))
    sys.exit(cli.main(["train", "--config", "tiny", "--data", data, "--workdir", workdir, "--resume",
                       f"train.steps={steps}", "train.batch_size=2", "train.ckpt_every=2", "train.keep=2",
                       "train.log_every=1", "train.eval_every=0", "data.workers=0", "model.dropout=0.1",
                       "data.scales=64,80", "data.max_size=96", "data.crop_scales=48,64", "data.crop_size=32,48",
                       "data.val_size=64", "data.max_targets=8", "data.bucket_step=96", "data.val_split=none",
                       "loss.matcher=hungarian_jax", *extra]))  # no host callback: the compilation cache holds it
