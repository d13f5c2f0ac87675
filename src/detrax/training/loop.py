"""Training: `setup` builds everything a run needs before its first step; `fit` is the loop, with logging, the
progress bar, checkpoints and evaluation as periodic actions beside it (`actions`).

Data parallel over every device of every host: the batch is sharded over a 1-D mesh axis 'data', weights and
optimizer state are replicated; XLA inserts the gradient all-reduce. Each host reads its own shard of the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx

from detrax.config import schema
from detrax.criterion.loss import set_loss
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.sources import read_split, resolve_split
from detrax.errors import TrainingError
from detrax.models.detr import DETR, tracing_rngs
from detrax.serving.infer import make_infer
from detrax.training import start, validation
from detrax.training.actions import Periodic, Stop, WatchFinite
from detrax.training.devices import data_mesh, global_batch, local_copy, replicate, shardings
from detrax.training.optim import learning_rates, optimizer
from detrax.training.reporting import Reporter, plot
from detrax.training.step import BATCH_KEYS, MASK_KEYS, make_train_step, trainable
from detrax.weights.checkpoint import Checkpoints


@dataclasses.dataclass
class Run:
    """What `fit` needs besides the config."""

    data_dir: str
    workdir: str
    resume: bool = False  # continue the workdir's run: from its latest checkpoint, else afresh as it was recorded
    init: str | None = None  # weights to start from (detrax, official, HF, torchvision)
    quiet: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this call
    allow_changes: bool = False  # resume although the config, --init or data differ from the run's (recorded)


@dataclasses.dataclass
class Trainer:
    """What `setup` gives the loop. A context manager: leaving it closes the loader, checkpoints and reporter."""

    state: Any  # nnx.State of (model, optimizer), replicated over the mesh
    step: Callable  # jitted (state, batch, i) -> (state, terms)
    batches: Iterator[dict]  # global batches, sharded over the mesh
    first: int  # the first step (a restored checkpoint's)
    end: int  # the step this call stops at
    actions: list[Callable]  # after every step: action(steps done, state, terms)
    save: Callable  # save(step, state): a checkpoint
    checkpoints: Checkpoints
    reporter: Reporter
    results: dict  # the last logged `train` metrics, `eval` metrics (and `eval_ema`), the `best` record
    graphdef: Any
    closing: contextlib.ExitStack


def fit(cfg: schema.Config, run: Run) -> dict:
    """Train `cfg` on `run.data_dir` (a COCO-format folder or any source of `data.sources`), writing to
    `run.workdir`. Returns the last step, whether a signal stopped it, whether `train.early_stop` did, the last
    train and eval metrics, the best record (`train.keep_best`), the weights."""
    t = setup(cfg, run)
    state, end, stopped = t.state, t.end, None
    with t.closing, Stop() as stop:
        for i in range(t.first, t.end):
            state, terms = t.step(state, next(t.batches), i)
            for action in t.actions:
                action(i + 1, state, terms)
            if (stopped := stop.requested()) or t.results.get("early_stopped"):
                end = i + 1
                break
        for action in t.actions:
            getattr(action, "finish", lambda: None)()  # e.g. the last step's finiteness, read late
        if t.checkpoints.latest_step() != end:
            t.save(end, state)
        if stopped:
            t.reporter.line(f"{stopped}: stopped at step {end}, checkpoint saved; --resume continues")
        elif t.results.get("early_stopped"):
            b = t.results["best"]
            t.reporter.line(f"train.early_stop={cfg.train.early_stop}: stopped at step {end}, {b['since']} "
                            f"evaluations after the best {b['metric']} ({b['value']:.4f}, step {b['step']}: "
                            f"{b['file']})")
    if t.reporter.enabled:
        plot(run.workdir)
    weights = jax.tree.map(local_copy, nnx.state(nnx.merge(t.graphdef, state)[0], nnx.Param))
    return {"step": end, "stopped": stopped, **t.results, "params": weights}


def setup(cfg: schema.Config, run: Run) -> Trainer:
    """Everything before the first step: the training split, how the run begins (`start.plan`), the model and
    optimizer state (fresh, initialised or restored), the step function, the batches and the actions."""
    n_proc, proc = jax.process_count(), jax.process_index()
    _check(cfg, run.workdir)
    validation.check(cfg.train, cfg.data.task)
    split = resolve_split(run.data_dir, cfg.data.train_split, "train", cfg.data.task)
    train_ds = read_split(run.data_dir, split, task=cfg.data.task, skip_bad=cfg.data.skip_bad)
    cfg, classes = start.resolve_classes(cfg, train_ds, run.workdir, run.resume)
    tc, dc = cfg.train, cfg.data
    per_epoch, total, drop = _schedule(tc, len(train_ds.records), train_ds.annotation_file or train_ds.root)

    closing = contextlib.ExitStack()
    with _closed_on_error(closing):
        ckpts = closing.enter_context(contextlib.closing(Checkpoints(run.workdir, tc.keep)))
        where = os.path.abspath(run.data_dir) if os.path.exists(run.data_dir) else run.data_dir  # or tfds:...
        data = {"path": where, "split": split, "images": len(train_ds.records)}
        begin = start.plan(cfg, run.workdir, run.resume, run.init, data, ckpts, run.allow_changes)
        if tc.freeze_detector and (cfg.model.dn_groups or cfg.model.encoder_head):
            raise ValueError("train.freeze_detector=true trains the mask head alone: the detector's training-only "
                             "denoising queries and encoder head would run frozen, for nothing; set "
                             "model.dn_groups=0 and model.encoder_head=false")
        if tc.freeze_detector and not begin.record.get("init"):
            raise ValueError("train.freeze_detector=true trains the mask head alone on a trained detector: give the "
                             "detector's weights with --init (a detrax run or weights file, an official or HF "
                             "checkpoint), or set train.freeze_detector=false to train everything")
        reporter = closing.enter_context(contextlib.closing(
            Reporter(run.workdir, total, per_epoch, tc.batch_size, enabled=proc == 0 and not run.quiet)))
        skipped = [f"data.skip_bad: {len(train_ds.problems)} bad labels or images of {split} skipped; the first: "
                   f"{train_ds.problems[0]['file']}: {train_ds.problems[0]['error']}"] if train_ds.problems else []
        for line in [begin.message, *(f"  allowed change: {c}" for c in begin.changes), *classes, *skipped]:
            reporter.line(line)  # the first line says how the run begins

        mesh = data_mesh()
        replicated, sharded = shardings(mesh)
        wrt = trainable(tc.freeze_detector)
        new_model = lambda: DETR(cfg.model, rngs=nnx.Rngs(tc.seed))
        new_optimizer = lambda model: nnx.Optimizer(model, optimizer(tc), wrt=wrt)
        if begin.restore is None:
            model = new_model()
            start.initialise(model, begin, train_ds.records, cfg, run.allow_changes, log=reporter.line)
            start.write_record(run.workdir, begin.record)
            opt = new_optimizer(model)
        else:  # the checkpoint holds every value: shapes alone, no initialiser run
            model, opt = nnx.eval_shape(lambda: (m := DETR(cfg.model, rngs=tracing_rngs(tc.seed)), new_optimizer(m)))
            nnx.reseed(model, default=tc.seed)  # RNG streams as real keys: the checkpoint's replace them
        model.eval()
        eval_graphdef = nnx.graphdef(model)  # dropout off, the same state
        model.train()
        rates = learning_rates(tc, total, drop)
        graphdef, state = nnx.split((model, opt))
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated)
                             if isinstance(x, jax.ShapeDtypeStruct) else replicate(x, replicated), state)
        step = make_train_step(graphdef, _loss_fn(cfg.loss, mesh), rates, wrt, tc.seed)

        train_data = dataset(train_ds.records, Augment(True, dc), tc.batch_size // n_proc, max_targets=dc.max_targets,
                             step=dc.bucket_step, seed=tc.seed, shard=(proc, n_proc), group=dc.group_batches)
        loader = closing.enter_context(Loader(train_data, workers=dc.workers))
        first, saved = 0, {}
        if begin.restore is not None:
            _, _, data_state, saved = ckpts.restore(state[0], state[1], begin.restore)  # fills state in place
            loader.restore(data_state)
            first = saved["step"]

        results: dict = {"train": {}, "eval": None}
        categories = [{"id": i, "name": n} | ({"isthing": int(train_ds.isthing[i])} if i in train_ds.isthing else {})
                      for i, n in sorted(train_ds.names.items())]
        evaluation = validation.Validation(make_infer(eval_graphdef, masks=dc.task != "detection"),
                                validation.val_split(run.data_dir, dc, reporter.line), cfg, sharded, eval_graphdef,
                                categories, run.workdir, reporter, results, saved.get("best"))
        evaluating = Periodic(tc.eval_every * per_epoch, total, evaluation)
        redo = evaluation.redo(first) and evaluating.due(first)
        reporter.begin(first, "resume" if begin.restore is not None else "start", begin.record, begin.changes,
                       redo_eval=redo)
        meta = {"config": schema.to_dict(cfg), "categories": categories, "start": begin.record}

        def save(done, state):
            ckpts.save(done, state[0], state[1], loader.state(), {"step": done, **meta, "best": results["best"]})
            evaluation.prune(ckpts)

        def log(done, state, terms):
            metrics = jax.device_get(terms)
            results["train"] = {k: float(v) for k, v in metrics.items()}
            lr, lr_backbone = (float(r) for r in rates(done - 1))
            reporter.log(done, "train", {**metrics, "lr": lr, "lr_backbone": lr_backbone})

        actions: list[Callable] = [
            WatchFinite(tc.max_bad_steps, reporter.line, ckpts),
            Periodic(tc.log_every, total, log),
            lambda done, state, terms: reporter.progress(done),
            Periodic(tc.ckpt_every, total, lambda done, state, terms: save(done, state)),  # before evaluating
            evaluating]
        if redo:  # killed between the checkpoint and its step's evaluation: evaluated again, as it would have been
            evaluation(first, state)
        end = total if run.stop_after is None else min(total, first + run.stop_after)
        if results.get("early_stopped") or evaluation.stopped:  # the first: agreed by every host (a redone one)
            end, results["early_stopped"] = first, True
            reporter.line(f"the run stopped early at step {first} (train.early_stop={tc.early_stop}); nothing to "
                          "train")
        keys = BATCH_KEYS + (MASK_KEYS if dc.task != "detection" else ())
        batches = (global_batch(local, sharded, keys) for local in loader)
        reporter.start(first)
    return Trainer(state, step, batches, first, end, actions, save, ckpts, reporter, results, graphdef, closing)


@functools.lru_cache(maxsize=4)
def _loss_fn(loss: schema.LossConfig, mesh) -> Callable:
    """The set loss of `loss` over `mesh`: one object for equal arguments, so that the train step compiled for it
    serves every run of the process (`make_train_step`)."""
    return functools.partial(set_loss, cfg=loss, mesh=mesh)


@contextlib.contextmanager
def _closed_on_error(stack: contextlib.ExitStack):
    """Closes what `stack` holds when set-up fails; on success the caller closes it."""
    try:
        yield
    except BaseException:
        stack.close()
        raise


def _check(cfg: schema.Config, workdir: str) -> None:
    """Fail before any work on a config that cannot run here or a workdir that cannot be written."""
    probe = os.path.join(workdir, f".write-test.{jax.process_index()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"{workdir}: the workdir cannot be written ({e}); nothing was started") from None
    if cfg.train.batch_size % jax.device_count():
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {jax.device_count()} "
                         "devices")
    if cfg.data.max_targets > cfg.model.num_queries:
        raise ValueError(f"data.max_targets={cfg.data.max_targets} exceeds model.num_queries={cfg.model.num_queries}")


def _schedule(tc: schema.TrainConfig, images: int, where: str) -> tuple[int, int, int]:
    """(steps per epoch, steps in all, the step at which the learning rate drops)."""
    per_epoch = images // tc.batch_size
    if per_epoch == 0:
        raise ValueError(f"{where}: {images} images, fewer than one batch of {tc.batch_size}")
    total = tc.steps or tc.epochs * per_epoch
    return per_epoch, total, round(total * tc.lr_drop / tc.epochs) if tc.steps else tc.lr_drop * per_epoch
