"""What runs beside the training loop (big_vision's and clu's periodic actions): each action is called after
every step as `action(step, state, terms)` (`step` counts the steps done) and decides for itself whether it is
due. Logging, the progress bar, the watch on non-finite steps, checkpoints and evaluation are actions; `Stop`
turns SIGTERM / Ctrl-C into a stop that every host agrees on."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from detrax.errors import BadSteps
from detrax.training.devices import local_copy


class Periodic:
    """`fn(step, state, terms)` after every `every` steps (0: never) before the run's last step `total`, and
    after the last one too when `at_end`."""

    def __init__(self, every: int, total: int, fn: Callable, at_end: bool = True):
        self.every, self.total, self.fn, self.at_end = every, total, fn, at_end

    def due(self, step: int) -> bool:
        return self.at_end if step == self.total else bool(self.every) and step % self.every == 0

    def __call__(self, step: int, state, terms) -> None:
        if self.due(step):
            self.fn(step, state, terms)


class WatchFinite:
    """A step whose loss or gradient was not finite was skipped by the step itself (the state passed through);
    say so, and after `limit` of them in a row stop the run with `BadSteps`, naming the checkpoint kept.

    It reads each step's flag when the next step has been dispatched (and `finish` reads the last one): reading
    it at once would make the host wait for every step before it queues the next, leaving the device idle while
    the host loads the next batch (a slower step: benchmarks/history.md). A stop comes one
    step later than the limit (skipped steps leave the weights as they were: a checkpoint written meanwhile holds
    the last good ones)."""

    def __init__(self, limit: int, say: Callable[[str], None], checkpoints):
        self.limit, self.say, self.checkpoints, self.bad = limit, say, checkpoints, 0
        self.pending: tuple[int, Any] | None = None  # (step, its `skipped` flag), not read yet

    def __call__(self, step: int, state, terms) -> None:
        pending, self.pending = self.pending, (step, terms["skipped"])
        if pending is not None:
            self._check(*pending)

    def finish(self) -> None:
        """Read the last step's flag (at the end of the loop)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self._check(*pending)

    def _check(self, step: int, skipped) -> None:
        if not int(local_copy(skipped)):
            self.bad = 0
            return
        self.bad += 1
        self.say(f"step {step}: loss or gradient not finite; step skipped ({self.bad} in a row)")
        if self.bad >= self.limit:
            raise BadSteps(
                f"steps {step - self.bad + 1}..{step}: the loss or gradient was not finite {self.bad} times in a "
                f"row (train.max_bad_steps={self.limit}); training stopped. The last good checkpoint, step "
                f"{self.checkpoints.latest_step()}, is kept in {self.checkpoints.directory}: check the data or "
                "lower train.lr, then --resume")


class Stop:
    """SIGTERM and SIGINT (Ctrl-C) ask the training loop to save a checkpoint and return; a second Ctrl-C
    interrupts at once. Installed only in the main thread, restored on exit. `requested()` is the signal that
    stops the run: on several hosts, a signal that reached any one of them stops all of them at the same step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is not ignored

    def requested(self) -> str | None:
        """The signal that stops the run, or None. On several hosts a collective: every host calls it at every
        step."""
        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        mine = signal.Signals[self.signal].value if self.signal else 0
        code = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
        return signal.Signals(code).name if code else None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
