"""Run checkpoints (orbax): weights, optimizer state, RNG streams, step and each host's data-iterator state of a
training run, and the model of a run's latest checkpoint. Weights files are `weights.py`'s."""

from __future__ import annotations

import json
import logging
import os

from detrax.errors import CheckpointWriteError
from detrax.models.detr import abstract


def _to_saveable(tree):
    """Typed PRNG keys -> their uint32 data (orbax stores plain arrays)."""
    import jax

    is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _on_host(tree):
    """Replicated arrays (the training state) as NumPy arrays of this host: orbax writes them from the first
    process alone, ~3x faster than as device arrays (its per-array cost dominates a small model's checkpoint)."""
    import jax
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array)
                        and x.is_fully_replicated else x, tree)


def _from_saveable(tree, like):
    import jax

    is_key = lambda x: hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)) if is_key(ref)
                        else x, tree, like)


class Checkpoints:
    """`workdir/checkpoints/<step>/` with items `model` (weights and RNG streams), `optimizer` and `meta` (config,
    step), and `workdir/data_state/<step>.<process>.json`, each host's loader state. Orbax writes to a temporary
    folder and renames it when complete, so a checkpoint is never seen half-written; the last `keep` are kept.
    The loader state is written (atomically) before the checkpoint it belongs to. `read_only`: a reader's view
    (loading, evaluating, predicting, a resume's config), which creates, cleans and deletes nothing, so that a
    run being written (a checkpoint's temporary folder) is left alone."""

    def __init__(self, workdir: str, keep: int = 3, read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.data_dir = os.path.join(os.path.abspath(workdir), "data_state")
        if not read_only:
            self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True))
            return
        quiet = logging.getLogger("absl")  # orbax warns that a read-only manager is read-only
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                read_only=True, create=False, max_to_keep=None, save_interval_steps=0,
                enable_async_checkpointing=False))
        finally:
            quiet.setLevel(level)

    def latest_step(self):
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of the checkpoints kept."""
        return list(self.manager.all_steps())

    def save(self, step: int, model_state, opt_state, data_state, meta: dict) -> None:
        """Write checkpoint `step`; on any failure (full disk, unwritable folder) raise CheckpointWriteError
        naming the step and the cause, with the previous checkpoint left as it was."""
        from flax import nnx

        a = self._ocp.args
        pure = lambda s: _on_host(_to_saveable(nnx.to_pure_dict(s)))
        path = self._data_path(step)
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            with open(path + ".tmp", "w") as f:
                json.dump(data_state, f)
            os.replace(path + ".tmp", path)
            self.manager.save(step, args=a.Composite(
                model=a.StandardSave(pure(model_state)), optimizer=a.StandardSave(pure(opt_state)),
                meta=a.JsonSave(meta)), force=True)
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for one I/O fault
            self.manager.reload()  # forget a step that was not committed
            for leftover in (path, path + ".tmp"):
                if os.path.exists(leftover) and self.latest_step() != step:
                    try:
                        os.remove(leftover)
                    except OSError:
                        pass
            raise CheckpointWriteError(
                f"checkpoint of step {step} could not be written to {self.directory} ({type(e).__name__}: {e}). "
                f"The previous checkpoint (step {self.latest_step()}) is intact; free space or fix the folder, "
                "then --resume") from e
        kept = {str(s) for s in self.manager.all_steps()}
        for name in os.listdir(self.data_dir):  # loader states of checkpoints that orbax has let go
            if name.split(".")[0] not in kept and not name.endswith(".tmp"):
                try:
                    os.remove(os.path.join(self.data_dir, name))
                except FileNotFoundError:
                    pass

    def meta(self, step: int) -> dict:
        """The meta item of checkpoint `step` (config, step, category names, start record)."""
        a = self._ocp.args
        return self.manager.restore(step, args=a.Composite(meta=a.JsonRestore()))["meta"]

    def _data_path(self, step: int) -> str:
        import jax

        return os.path.join(self.data_dir, f"{step}.{jax.process_index()}.json")

    def restore(self, model_like, opt_like=None, step=None):
        """(model_state, opt_state or None, data_state, meta) of `step` (default: the latest); `*_like` are
        nnx.States of the right structure (their values are replaced)."""
        import jax
        from flax import nnx

        a = self._ocp.args
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(
            x, "sharding", None)) if hasattr(x, "dtype") else x, _to_saveable(t))
        def back(restored, like):
            nnx.replace_by_pure_dict(like, _from_saveable(restored, nnx.to_pure_dict(like)))
            return like

        items = {"model": a.StandardRestore(abstract(nnx.to_pure_dict(model_like))), "meta": a.JsonRestore()}
        if opt_like is not None:
            items["optimizer"] = a.StandardRestore(abstract(nnx.to_pure_dict(opt_like)))
        try:
            out = self.manager.restore(step, args=a.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:  # orbax: a tree or a shape that does not fit
            raise ValueError(f"{self.directory}: checkpoint {step} does not fit this model and optimizer "
                             f"({type(e).__name__}: {str(e)[:300]}); it was written for another model config or by "
                             "another version of detrax") from None
        opt = back(out["optimizer"], opt_like) if opt_like is not None else None
        data = None
        if opt_like is not None:
            with open(self._data_path(step)) as f:
                data = json.load(f)
        return back(out["model"], model_like), opt, data, out["meta"]

    def ema(self, step: int) -> dict | None:
        """The weights' moving average that checkpoint `step` holds (a pure dict of the trained weights), or None
        when its run keeps none (`train.ema_decay=0`)."""
        a = self._ocp.args
        return ema_of(self.manager.restore(step, args=a.Composite(optimizer=a.StandardRestore()))["optimizer"])

    def close(self):
        self.manager.close()


def ema_of(opt_state: dict) -> dict | None:
    """The weights' moving average in a run's optimizer state (`nnx.to_pure_dict` of it, or as orbax restores it):
    the state of `training.optim.weight_ema`, the chain's last link; None when the run keeps none."""
    links = opt_state.get("opt_state") or {}
    last = links[max(links, key=int)] if isinstance(links, dict) and links else None
    return last["ema"] if isinstance(last, dict) and set(last) == {"updates", "ema"} else None


BEST = "best.json"  # in a run's workdir: which of its best/ files is the best (`training.best`)


def best_weights(workdir: str) -> tuple[str, dict] | None:
    """(the path of a run's best weights file, its record: metric, value, step, raw or ema), or None when the run
    keeps none (`train.keep_best`)."""
    path = os.path.join(workdir, BEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    return os.path.join(workdir, record["file"]), record


def load_run(workdir: str, step=None, with_meta: bool = False, ema: bool | None = False):
    """The model of a training run's latest checkpoint (or `step`), in eval mode (and the checkpoint's meta:
    config, step, category names); with `ema`, its weights' moving average in place of the trained weights (None:
    where the run keeps one)."""
    from flax import nnx

    from detrax.config import schema

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir}: not a detrax run (no checkpoints/ folder in it) nor a weights file")
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        step = ckpts.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{workdir}: its run has no checkpoint yet (none in {ckpts.directory})")
        meta = ckpts.meta(step)
        cfg = schema.from_dict(meta["config"]).model
        shapes = abstract(cfg)
        nnx.reseed(shapes, default=0)  # RNG streams get real keys: their restored values replace them
        graphdef, like = nnx.split(shapes)
        model_state, _, _, _ = ckpts.restore(like, None, step)
        if ema is None:
            ema = meta["config"]["train"].get("ema_decay", 0) > 0
        if ema:
            average = ckpts.ema(step)
            if average is None:
                raise ValueError(f"{workdir}: its checkpoint of step {step} keeps no moving average of the weights "
                                 "(train.ema_decay=0)")
            nnx.replace_by_pure_dict(model_state, average)
    finally:
        ckpts.close()
    model = nnx.merge(graphdef, model_state)
    model.eval()
    return (model, meta) if with_meta else model
