"""Training: the official optimizer, one jitted step, and the loop that checkpoints, evaluates and reports.

Data parallel over every device of every host: the batch is sharded over a 1-D mesh axis 'data', weights and
optimizer state are replicated; XLA inserts the gradient all-reduce. Each host reads its own shard of the data.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from detrax import configs
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.sources import list_splits, read_split
from detrax.data.transforms import normalize_batch
from detrax.errors import BadSteps, TrainingError
from detrax.infer import make_infer
from detrax.loss import criterion
from detrax.model import DETR
from detrax.optim import lr_factor, optimizer

BATCH_KEYS = ("pixels", "mask", "labels", "boxes", "valid")


def _compiler_options() -> dict | None:
    """On the CPU, LLVM's level-1 optimisation: the step's heavy work runs in library kernels (convolutions,
    matrix products) that it does not touch, and it compiles faster (figures: benchmarks/README.md)."""
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None


def make_train_step(graphdef, loss_fn):
    """A jitted (state, batch, i) -> (state, metrics): forward, set loss, backward, clip, AdamW at the learning
    rate of loop step `i` (0-based). A step whose loss or gradient is not finite changes nothing (the state
    passes through) and reports `skipped` = 1."""

    @functools.partial(jax.jit, donate_argnums=0, compiler_options=_compiler_options())
    def step(state, batch, i):
        old = jax.tree.leaves(state)  # the arrays themselves: merge's variables are updated in place below
        model, opt = nnx.merge(graphdef, state)
        pixels = normalize_batch(batch["pixels"], batch["mask"])
        targets = {k: batch[k] for k in ("labels", "boxes", "valid")}

        def objective(model):
            terms = loss_fn(model(pixels, batch["mask"]), targets)
            return terms["loss"], terms

        (loss, terms), grads = nnx.value_and_grad(objective, has_aux=True)(model)
        terms["grad_norm"] = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(terms["grad_norm"])
        opt.update(model, grads, step=i)
        leaves, treedef = jax.tree.flatten(nnx.state((model, opt)))
        terms["skipped"] = (~ok).astype(jnp.int32)
        return jax.tree.unflatten(treedef, [jnp.where(ok, n, o) for n, o in zip(leaves, old, strict=True)]), terms

    return step


class Stop:
    """SIGTERM and SIGINT (Ctrl-C) ask the training loop to save a checkpoint and return; a second Ctrl-C
    interrupts at once. Installed only in the main thread, restored on exit. `agreed()` is the signal that stops
    the run: on several hosts, a signal that reached any one of them stops all of them at the same step."""

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

    def agreed(self) -> str | None:
        """This host's signal, or on several hosts the one any host received (every host must call this at the
        same step: it is a collective)."""
        if jax.process_count() == 1:
            return self.signal
        from jax.experimental import multihost_utils

        mine = signal.Signals[self.signal].value if self.signal else 0
        code = int(np.max(multihost_utils.process_allgather(np.int32(mine))))
        return signal.Signals(code).name if code else None

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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


def resolve_split(root: str, want: str, prefix: str) -> str:
    if want != "auto":
        return want
    found = list_splits(root)
    match = [s for s in found if s.startswith(prefix)]
    if not match:
        raise ValueError(f"{root}: no split named {prefix}* among {found}; set data.{prefix}_split")
    return match[0]


def fit(cfg: configs.Config, run: Run) -> dict:
    """Train `cfg` on the COCO-format folder `run.data_dir`, writing to `run.workdir`. Returns the last eval."""
    from detrax import start
    from detrax.checkpoint import Checkpoints
    from detrax.evaluate import evaluate
    from detrax.reporting import Reporter, plot

    n_proc, proc = jax.process_count(), jax.process_index()
    tc, dc = cfg.train, cfg.data
    _probe(run.workdir)
    if tc.batch_size % jax.device_count():
        raise ValueError(f"train.batch_size={tc.batch_size} is not divisible by the {jax.device_count()} devices")
    if dc.max_targets > cfg.model.num_queries:
        raise ValueError(f"data.max_targets={dc.max_targets} exceeds model.num_queries={cfg.model.num_queries}")
    split = resolve_split(run.data_dir, dc.train_split, "train")
    train_ds = read_split(run.data_dir, split)
    where = train_ds.annotation_file or train_ds.root
    if train_ds.num_classes > cfg.model.num_classes:
        raise ValueError(f"{where}: category ids reach {train_ds.num_classes - 1}; set "
                         f"model.num_classes={train_ds.num_classes} (it is {cfg.model.num_classes})")
    per_epoch = len(train_ds.records) // tc.batch_size
    if per_epoch == 0:
        raise ValueError(f"{where}: {len(train_ds.records)} images, fewer than one batch of {tc.batch_size}")
    total = tc.steps or tc.epochs * per_epoch
    drop = round(total * tc.lr_drop / tc.epochs) if tc.steps else tc.lr_drop * per_epoch

    ckpts = Checkpoints(run.workdir, tc.keep)
    where_from = os.path.abspath(run.data_dir) if os.path.exists(run.data_dir) else run.data_dir  # a folder, tfds:...
    data = {"path": where_from, "split": split, "images": len(train_ds.records)}
    try:
        begin = start.plan(cfg, run.workdir, run.resume, run.init, data, ckpts, run.allow_changes)
    except BaseException:
        ckpts.close()
        raise
    reporter = Reporter(run.workdir, total, per_epoch, tc.batch_size, enabled=proc == 0 and not run.quiet)
    reporter.line(begin.message)  # the first line says how the run begins
    for change in begin.changes:
        reporter.line(f"  allowed change: {change}")
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = DETR(cfg.model, rngs=nnx.Rngs(tc.seed))
    if begin.restore is None:
        for note in start.initialise(model, begin, train_ds.records, cfg, run.allow_changes):
            reporter.line(note)
        start.write_record(run.workdir, begin.record)
    model.eval()
    eval_graphdef = nnx.graphdef(model)  # dropout off; the same state
    model.train()
    opt = nnx.Optimizer(model, optimizer(tc, total, drop), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    state = replicate(state, replicated)
    loss_fn = criterion(cfg.loss)
    step_fn = make_train_step(graphdef, lambda out, t: loss_fn(out, t, mesh=mesh))
    factor = lr_factor(total, drop)

    augment = Augment(True, dc.augment, dc.scales, dc.max_size, dc.crop_scales, dc.crop_size, dc.val_size)
    train_data = dataset(train_ds.records, augment, tc.batch_size // n_proc, max_targets=dc.max_targets,
                         step=dc.bucket_step, seed=tc.seed, shard=(proc, n_proc), group=dc.group_batches)
    loader = Loader(train_data, workers=dc.workers)
    first = 0
    if begin.restore is not None:
        _, _, data_state, meta = ckpts.restore(state[0], state[1], begin.restore)  # fills state in place
        loader.restore(data_state)
        first = meta["step"]
    reporter.begin(first, "resume" if begin.restore is not None else "start", begin.record, begin.changes)
    val_ds = None
    try:
        if dc.val_split != "none":
            val_ds = read_split(run.data_dir, resolve_split(run.data_dir, dc.val_split, "val"))
    except ValueError as e:
        reporter.line(f"no evaluation: {e}")

    def save(step):
        ckpts.save(step, state[0], state[1], loader.state(),
                   {"step": step, "config": configs.to_dict(cfg), "names": train_ds.names, "start": begin.record})

    infer = make_infer(eval_graphdef)  # the one inference path, on the live training state

    def run_eval(step):
        if val_ds is None or proc != 0:
            return None
        if n_proc == 1:  # the replicated weights as they are; the batch sharded over the devices
            put = lambda x: jax.device_put(x, sharded)
            live = lambda *batch: infer(state[0], *map(put, batch))
        else:  # one host evaluates: its own copy of the weights
            weights = jax.tree.map(local_copy, state[0])
            live = lambda *batch: infer(weights, *batch)
        metrics = evaluate(live, val_ds, dc, batch_size=tc.batch_size)
        reporter.log(step, "eval", metrics)
        return metrics

    metrics, last_eval, stopped = {}, None, None
    reporter.start(first)
    end = total if run.stop_after is None else min(total, first + run.stop_after)
    try:
        with Stop() as stop:
            bad = 0
            for step in range(first, end):
                local = next(loader)
                batch = {k: jax.make_array_from_process_local_data(sharded, local[k]) for k in BATCH_KEYS}
                state, terms = step_fn(state, batch, step)
                done = step + 1
                if int(local_copy(terms["skipped"])):  # the state passed through unchanged
                    bad += 1
                    reporter.line(f"step {done}: loss or gradient not finite; step skipped ({bad} in a row)")
                    if bad >= tc.max_bad_steps:
                        raise BadSteps(
                            f"steps {done - bad + 1}..{done}: the loss or gradient was not finite {bad} times in a "
                            f"row (train.max_bad_steps={tc.max_bad_steps}); training stopped. The last good "
                            f"checkpoint, step {ckpts.latest_step()}, is kept in {ckpts.directory}: check the data "
                            "or lower train.lr, then --resume")
                else:
                    bad = 0
                if done % tc.log_every == 0 or done == total:
                    metrics = jax.device_get(terms)
                    reporter.log(done, "train", {**metrics, "lr": tc.lr * float(factor(step)),
                                                 "lr_backbone": tc.lr_backbone * float(factor(step))})
                reporter.progress(done)
                if done % tc.ckpt_every == 0 and done < total:
                    save(done)
                if tc.eval_every and done % (tc.eval_every * per_epoch) == 0 and done < total:
                    last_eval = run_eval(done)
                if stop.signal or n_proc > 1:
                    stopped = stop.agreed()
                    if stopped:
                        end = done
                        break
            if ckpts.latest_step() != end:
                save(end)
            if stopped:
                reporter.line(f"{stopped}: stopped at step {end}, checkpoint saved; --resume continues")
            elif end == total:
                last_eval = run_eval(total) or last_eval
    except OSError as e:
        if isinstance(e, TrainingError):
            raise
        raise TrainingError(f"writing to {run.workdir} failed ({e}); the last checkpoint, step "
                            f"{ckpts.latest_step()}, is intact") from e
    finally:
        loader.close()
        ckpts.close()
        reporter.close()
    if proc == 0 and not run.quiet:
        plot(run.workdir)
    return {"step": end, "stopped": stopped, "train": {k: float(v) for k, v in metrics.items()}, "eval": last_eval,
            "params": jax.tree.map(local_copy, nnx.state(nnx.merge(graphdef, state)[0], nnx.Param))}


def _probe(workdir: str) -> None:
    """Fail before any work when the workdir cannot be written."""
    probe = os.path.join(workdir, f".write-test.{jax.process_index()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise TrainingError(f"{workdir}: the workdir cannot be written ({e}); nothing was started") from None


def local_copy(x):
    """This host's copy of a replicated array, as NumPy."""
    return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def replicate(tree, sharding):
    """Host values identical on every host -> arrays replicated over the whole mesh."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def params_digest(params) -> str:
    """A hash of parameter values, to compare runs."""
    import hashlib

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return h.hexdigest()

