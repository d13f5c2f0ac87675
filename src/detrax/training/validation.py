"""Evaluation during training: COCO AP (or PQ) of the live weights on the val split, of their moving average
beside them (`train.ema_decay`), and the best kept (`train.keep_best`, `train.early_stop`: `best.Best`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from flax import nnx

from detrax.config import schema
from detrax.data.sources import read_split, resolve_split
from detrax.evaluation.coco import evaluate, metric_names
from detrax.models.detr import plain
from detrax.training.best import Best, averaged
from detrax.training.devices import local_copy
from detrax.weights.files import save_weights


def val_split(data_dir: str, dc: schema.DataConfig, say: Callable[[str], None]):
    """The split that evaluation scores, or None (data.val_split=none, or no such split: said once)."""
    if dc.val_split == "none":
        return None
    try:
        return read_split(data_dir, resolve_split(data_dir, dc.val_split, "val", dc.task), task=dc.task,
                          skip_bad=dc.skip_bad)
    except ValueError as e:
        say(f"no evaluation: {e}")
        return None


def check(tc: schema.TrainConfig, task: str) -> None:
    """Fail before any step on a `keep_best` metric that evaluation does not give, or `early_stop` without one."""
    if tc.early_stop and not tc.keep_best:
        raise ValueError(f"train.early_stop={tc.early_stop}: it counts evaluations without a new best of the "
                         "train.keep_best metric: set train.keep_best too (AP, AP50, ...)")
    if tc.keep_best and tc.keep_best not in metric_names(task):
        raise ValueError(f"train.keep_best={tc.keep_best}: evaluating {task} gives "
                         f"{', '.join(metric_names(task))}")


class Validation:
    """The evaluation action (`actions.Periodic` calls it): scores the raw weights and their average, logs
    `eval` and `eval_ema`, and updates the best (from `record`, a checkpoint's, when resuming). `results` gets
    `eval`, `eval_ema`, `best` and `early_stopped`."""

    def __init__(self, infer, val_ds, cfg: schema.Config, sharded, graphdef, categories: list, workdir: str,
                 reporter, results: dict, record: dict | None = None):
        self.score = _evaluator(infer, val_ds, cfg, sharded)
        self.cfg, self.graphdef, self.categories, self.reporter, self.results = (
            cfg, graphdef, categories, reporter, results)
        tc = cfg.train
        if tc.keep_best and val_ds is None:
            raise ValueError(f"train.keep_best={tc.keep_best} keeps the best evaluated weights: the data has no val "
                             f"split to evaluate on (data.val_split={cfg.data.val_split})")
        self.best = Best(workdir, tc.keep_best, tc.early_stop, record, reporter.line) if tc.keep_best else None
        results["best"] = self.best.record if self.best else None
        if self.best and jax.process_index() == 0:
            self.best.write()  # best.json names the record's file (a resumed run's own, not a lost future's)

    def __call__(self, done: int, state, terms=None) -> None:
        weights = {"raw": state[0]}
        if self.cfg.train.ema_decay:
            weights["ema"] = averaged(state[0], state[1])
        scores = {kind: self.score(w) for kind, w in weights.items()}
        self.results["eval"], self.results["eval_ema"] = scores["raw"], scores.get("ema")
        for kind, name in (("raw", "eval"), ("ema", "eval_ema")):
            if scores.get(kind) is not None:
                self.reporter.log(done, name, scores[kind])
        if self.best is not None:
            stop = scores["raw"] is not None and self.best.update(
                done, scores, lambda kind, path: self._write(weights[kind], path))
            self.results["early_stopped"] = _agreed(stop)

    def _write(self, weights, path: str) -> None:
        dc = self.cfg.data
        model = nnx.merge(self.graphdef, weights)  # replicated: each host reads its own copy
        save_weights(plain(model), path, self.categories,
                     {"val_size": dc.val_size, "max_size": dc.max_size, "bucket_step": dc.bucket_step})

    def redo(self, step: int) -> bool:
        """Whether a resumed run evaluates its checkpoint's step again: the best is kept and that evaluation is
        not in the checkpoint's record (the checkpoint was written before it)."""
        return self.best is not None and step > 0 and self.best.due(step)

    @property
    def stopped(self) -> bool:
        """Whether the record says the run has stopped early (a resumed run that had)."""
        return self.best is not None and self.best.stopped

    def prune(self, checkpoints) -> None:
        """best/ keeps the files that the record or a kept checkpoint's record names (after each checkpoint)."""
        if self.best is not None and jax.process_index() == 0:
            self.best.prune([checkpoints.meta(s).get("best") for s in checkpoints.steps()])


def _agreed(stop: bool) -> bool:
    """The first host's decision, on every host (only it evaluates)."""
    if jax.process_count() == 1:
        return bool(stop)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(stop)))


def _evaluator(infer, val_ds, cfg: schema.Config, sharded) -> Callable:
    """weights -> COCO AP of the live training weights on `val_ds` through the one inference path (None on hosts
    other than the first, or without a val split). On one host the replicated weights are used as they are, the
    batch sharded over the devices; on several, the first host evaluates on its own copy of the weights."""

    def run(weights):
        if val_ds is None or jax.process_index() != 0:
            return None
        if jax.process_count() == 1:
            put = lambda x: jax.device_put(x, sharded)
            live = lambda *batch: infer(weights, *map(put, batch))
            devices = jax.device_count()
        else:
            mine = jax.tree.map(local_copy, weights)
            live, devices = (lambda *batch: infer(mine, *batch)), 1
        return evaluate(live, val_ds, cfg.data, batch_size=cfg.train.batch_size, multiple=devices,
                        class_ids=cfg.model.class_ids)

    return run
