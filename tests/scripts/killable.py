"""`detrax` with the command line given (tests/test_reliability.py: `detrax train --resume` of a tiny DETR), for the
kill and signal tests: argv = [kill=WHEN] detrax-arguments ...

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


def arm(when: str, steps: int | None) -> None:
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
    args = sys.argv[1:]
    if args and args[0].startswith("kill="):
        steps = [int(a.split("=")[1]) for a in args if a.startswith("train.steps=")]
        arm(args.pop(0).split("=", 1)[1], steps[-1] if steps else None)
    sys.exit(cli.main(args))
