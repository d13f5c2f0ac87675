"""The best weights of a run (`train.keep_best`), the stop when they no longer improve (`train.early_stop`), and
the weights' moving average that is evaluated beside them (`train.ema_decay`).

After each evaluation, `Best.update` compares the metric of the raw weights (and of their moving average) with
the best so far. A new best is written as a detrax weights file, `best/<step>-<raw|ema>.safetensors` in the
workdir, and `best.json` names it (`detrax.load(RUN, weights="best")` reads it). The record (the best so far,
evaluations since, the last evaluated step) travels in every checkpoint's meta, so a resume continues it exactly:
best/ keeps the files that the live record or a kept checkpoint's record names, so the best of the checkpoint a
run resumes from is still there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import jax
from flax import nnx

from detrax.weights.checkpoint import BEST, ema_of

FOLDER = "best"


def averaged(model_state, opt_state):
    """The model state with its trained weights replaced by their moving average (`optim.weight_ema`), or None
    when the optimizer keeps none."""
    average = ema_of(nnx.to_pure_dict(opt_state))
    if average is None:
        return None
    out = jax.tree.map(lambda x: x, model_state)  # a new State over the same arrays
    nnx.replace_by_pure_dict(out, average)
    return out


class Best:
    """Tracks `metric` over a run's evaluations; `patience` > 0 asks for a stop after that many evaluations
    without a new best. `record` is a checkpoint's (None: a new run); `say` reports each new best."""

    def __init__(self, workdir: str, metric: str, patience: int = 0, record: dict | None = None,
                 say: Callable[[str], None] = print):
        self.workdir, self.metric, self.patience, self.say = workdir, metric, patience, say
        fresh = {"metric": metric, "value": None, "step": None, "weights": None, "file": None, "eval": None,
                 "since": 0, "evaluated": 0}
        if record and record["metric"] != metric:  # a resume with --allow-changes
            say(f"train.keep_best={metric}: the run kept its best by {record['metric']} until step "
                f"{record['evaluated']}; by {metric} from here on")
            record = {**fresh, "evaluated": record["evaluated"]}
        self.record = dict(record or fresh)

    def due(self, step: int) -> bool:
        """Whether the evaluation of `step` is not in the record yet (a checkpoint is written before the
        evaluation of its step: a run killed between the two evaluates again on resuming)."""
        return self.record["evaluated"] < step

    @property
    def stopped(self) -> bool:
        return bool(self.patience) and self.record["since"] >= self.patience

    def update(self, step: int, scores: dict, save: Callable[[str, str], None]) -> bool:
        """The evaluation of `step`: `scores` {"raw": metrics, "ema": metrics or absent}; `save(kind, path)`
        writes those weights. Returns whether the run should stop (`early_stop`)."""
        found = [(m[self.metric], kind) for kind, m in scores.items() if m is not None and self.metric in m]
        if not found:
            given = sorted(next((m for m in scores.values() if m), {}))
            raise ValueError(f"train.keep_best={self.metric}: the evaluation gives no such number (it gives "
                             f"{', '.join(given)})")
        value, kind = max(found, key=lambda f: (f[0], f[1] == "ema"))  # a tie: the average
        r = self.record
        r["evaluated"] = step
        if r["value"] is None or value > r["value"]:
            file = f"{FOLDER}/{step}-{kind}.safetensors"
            os.makedirs(os.path.join(self.workdir, FOLDER), exist_ok=True)
            save(kind, os.path.join(self.workdir, file))
            r.update(value=float(value), step=step, weights=kind, file=file, since=0,
                     eval={k: float(v) for k, v in scores[kind].items() if isinstance(v, int | float)})
            self.write()
            self.say(f"step {step}: the best {self.metric} so far, {value:.4f} ({kind} weights): {file}")
        else:
            r["since"] += 1
        return self.stopped

    def write(self) -> None:
        """best.json: the record's file, metric, value and the best's eval metrics, written atomically."""
        if self.record["file"] is None:
            return
        path = os.path.join(self.workdir, BEST)
        with open(path + ".tmp", "w") as f:
            json.dump({k: self.record[k] for k in ("metric", "value", "step", "weights", "file", "eval")}, f,
                      indent=1)
        os.replace(path + ".tmp", path)

    def prune(self, kept_records: list[dict]) -> None:
        """Remove the files of best/ that neither the live record nor a kept checkpoint's record names."""
        folder = os.path.join(self.workdir, FOLDER)
        named = {r.get("file") for r in [self.record, *kept_records] if r}
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if f"{FOLDER}/{name}" not in named:
                try:
                    os.remove(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
