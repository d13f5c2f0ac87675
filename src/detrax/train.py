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
from detrax.backbone import ResNet
from detrax.data.loader import Augment, Loader, dataset
from detrax.data.sources import list_splits, read_split
from detrax.data.transforms import normalize_batch
from detrax.errors import BadSteps, TrainingError
from detrax.loss import criterion
from detrax.model import DETR, WEIGHTS, assemble, weight_arrays

BATCH_KEYS = ("pixels", "mask", "labels", "boxes", "valid")


def _group(params):
    """'backbone' for the backbone's parameters, 'rest' for the others."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "backbone" if getattr(path[0], "key", None) == "backbone" else "rest", params)


def optimizer(cfg: configs.TrainConfig, total_steps: int, drop_step: int) -> optax.GradientTransformation:
    """AdamW with the backbone at its own learning rate, both x0.1 at `drop_step`, after clipping the global
    gradient norm, as the official main.py."""
    sched = lambda lr: optax.piecewise_constant_schedule(lr, {drop_step: 0.1}) if drop_step < total_steps else lr
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_max_norm) if cfg.clip_max_norm > 0 else optax.identity(),
        optax.multi_transform({"rest": optax.adamw(sched(cfg.lr), weight_decay=cfg.weight_decay),
                               "backbone": optax.adamw(sched(cfg.lr_backbone), weight_decay=cfg.weight_decay)},
                              _group))


def _compiler_options() -> dict | None:
    """On the CPU, LLVM's level-1 optimisation: the step's heavy work runs in library kernels (convolutions,
    matrix products) that it does not touch, and it compiles in about 15 s instead of 19 for DETR-R50
    (benchmarks/bench_train.py)."""
    return {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else None


def make_train_step(graphdef, loss_fn):
    """A jitted (state, batch) -> (state, metrics): forward, set loss, backward, clip, AdamW. A step whose loss
    or gradient is not finite changes nothing (the state passes through) and reports `skipped` = 1."""

    @functools.partial(jax.jit, donate_argnums=0, compiler_options=_compiler_options())
    def step(state, batch):
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
        opt.update(model, grads)
        leaves, treedef = jax.tree.flatten(nnx.state((model, opt)))
        terms["skipped"] = (~ok).astype(jnp.int32)
        return jax.tree.unflatten(treedef, [jnp.where(ok, n, o) for n, o in zip(leaves, old, strict=True)]), terms

    return step


class Stop:
    """SIGTERM and SIGINT (Ctrl-C) ask the training loop to save a checkpoint and return; a second Ctrl-C
    interrupts at once. Installed only in the main thread, restored on exit."""

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

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class Run:
    """What `fit` needs besides the config."""

    data_dir: str
    workdir: str
    resume: bool = False
    init: str | None = None  # weights to start from (detrax, official, HF, torchvision)
    quiet: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this call


def resolve_split(root: str, want: str, prefix: str) -> str:
    if want != "auto":
        return want
    found = list_splits(root)
    match = [s for s in found if s.startswith(prefix)]
    if not match:
        raise ValueError(f"{root}: no split named {prefix}* among {found}; set data.{prefix}_split")
    return match[0]


def init_from(model: DETR, path: str) -> list[str]:
    """Copy the weights of `path` into `model` where the shapes agree; the class head may differ (another number
    of classes) and is then left freshly initialised. Returns the names left fresh."""
    from detrax.api import load

    source = weight_arrays(load(path).model)
    target = weight_arrays(model)
    fresh, arrays = [], {}
    for name, value in target.items():
        src = source.get(name)
        if src is not None and src.shape == value.shape:
            arrays[name] = src
        elif name.startswith("class_embed"):
            arrays[name] = value
            fresh.append(name)
        else:
            raise ValueError(f"{path}: weight {name} is {None if src is None else src.shape}, this model needs "
                             f"{value.shape}")
    nnx.update(model, nnx.state(assemble(model.config, arrays, init_rest=True), WEIGHTS))
    return fresh


def calibrate(model: DETR, records, dc: configs.DataConfig) -> None:
    """Frozen batch-norm statistics from a batch of training images (val transform): a from-scratch backbone
    starts normalised instead of with activations that grow by orders of magnitude per stage."""
    augment = Augment(False, val_size=dc.val_size, max_size=dc.max_size)
    with Loader(dataset(records, augment, len(records), max_targets=dc.max_targets, step=dc.bucket_step)) as it:
        batch = next(it)
    model.backbone.stages(normalize_batch(batch["pixels"], batch["mask"]), calibrate=True)


def fit(cfg: configs.Config, run: Run) -> dict:
    """Train `cfg` on the COCO-format folder `run.data_dir`, writing to `run.workdir`. Returns the last eval."""
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
    train_ds = read_split(run.data_dir, resolve_split(run.data_dir, dc.train_split, "train"))
    where = train_ds.annotation_file or train_ds.root
    if train_ds.num_classes > cfg.model.num_classes:
        raise ValueError(f"{where}: category ids reach {train_ds.num_classes - 1}; set "
                         f"model.num_classes={train_ds.num_classes} (it is {cfg.model.num_classes})")
    per_epoch = len(train_ds.records) // tc.batch_size
    if per_epoch == 0:
        raise ValueError(f"{where}: {len(train_ds.records)} images, fewer than one batch of {tc.batch_size}")
    total = tc.steps or tc.epochs * per_epoch
    drop = round(total * tc.lr_drop / tc.epochs) if tc.steps else tc.lr_drop * per_epoch

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    model = DETR(cfg.model, rngs=nnx.Rngs(tc.seed))
    notes = []
    if run.init and not run.resume:
        fresh = init_from(model, run.init)
        notes.append(f"initialised from {run.init}" + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    if tc.calibrate_bn and isinstance(model.backbone, ResNet) and not run.init and not run.resume:
        calibrate(model, train_ds.records[: 4 * tc.batch_size], dc)
        notes.append(f"frozen batch norm calibrated on {min(len(train_ds.records), 4 * tc.batch_size)} images")
    opt = nnx.Optimizer(model, optimizer(tc, total, drop), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    state = replicate(state, replicated)
    loss_fn = criterion(cfg.loss)
    step_fn = make_train_step(graphdef, lambda out, t: loss_fn(out, t, mesh=mesh))

    augment = Augment(True, dc.augment, dc.scales, dc.max_size, dc.crop_scales, dc.crop_size, dc.val_size)
    train_data = dataset(train_ds.records, augment, tc.batch_size // n_proc, max_targets=dc.max_targets,
                         step=dc.bucket_step, seed=tc.seed, shard=(proc, n_proc), group=dc.group_batches)
    loader = Loader(train_data, workers=dc.workers)
    ckpts = Checkpoints(run.workdir, tc.keep)
    start = 0
    if run.resume and ckpts.latest_step() is not None:
        _, _, data_state, meta = ckpts.restore(state[0], state[1])  # fills state in place
        loader.restore(data_state)
        start = meta["step"]
        notes.append(f"resumed from step {start}")
    reporter = Reporter(run.workdir, total, per_epoch, tc.batch_size, enabled=proc == 0 and not run.quiet)
    for note in notes:
        reporter.line(note)
    val_ds = None
    try:
        val_ds = read_split(run.data_dir, resolve_split(run.data_dir, dc.val_split, "val"))
    except ValueError as e:
        reporter.line(f"no evaluation: {e}")

    def save(step):
        ckpts.save(step, state[0], state[1], loader.state(),
                   {"step": step, "config": configs.to_dict(cfg), "names": train_ds.names})

    evaluator = []  # one Detector for every evaluation: its compiled shapes are reused, not rebuilt

    def run_eval(step):
        if val_ds is None or proc != 0:
            return None
        from detrax.api import Detector

        local = {k: local_copy(v) for k, v in weight_arrays(nnx.merge(graphdef, state)[0]).items()}
        if evaluator:
            evaluator[0].set_weights(local)
        else:
            evaluator.append(Detector(assemble(cfg.model, local)))
        metrics = evaluate(evaluator[0], val_ds, dc, batch_size=tc.batch_size)
        reporter.log(step, "eval", metrics)
        return metrics

    metrics, last_eval, stopped = {}, None, None
    reporter.start(start)
    end = total if run.stop_after is None else min(total, start + run.stop_after)
    try:
        with Stop() as stop:
            bad = 0
            for step in range(start, end):
                local = next(loader)
                batch = {k: jax.make_array_from_process_local_data(sharded, local[k]) for k in BATCH_KEYS}
                state, terms = step_fn(state, batch)
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
                    reporter.log(done, "train", metrics)
                reporter.progress(done)
                if done % tc.ckpt_every == 0 and done < total:
                    save(done)
                if tc.eval_every and done % (tc.eval_every * per_epoch) == 0 and done < total:
                    last_eval = run_eval(done)
                if stop.signal:
                    stopped, end = stop.signal, done
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

