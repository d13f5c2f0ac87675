"""One door for every weights path, for `detrax.load`, `--init` and `detrax convert`: a training run's workdir
(its latest checkpoint), detrax's own weights file, or any checkpoint `convert` reads (official, HF, torchvision,
BiT, MasterSkepticista/detr's files and workdirs), each told by its content and read once."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np

from detrax.config import schema
from detrax.models.detr import AID_DEFAULTS, AID_FIELDS, DETR, assemble, plain, weight_arrays
from detrax.weights import checkpoint, convert, files, flax_detr


@dataclasses.dataclass
class Opened:
    model: DETR  # in eval mode
    kind: str  # run | detrax | the converted layout (official, hf, torchvision, bit, flax_detr ...)
    categories: list  # [{id, name (, isthing)}] of the class outputs, where the source names them
    data: schema.DataConfig | None  # the val transform the weights were trained at, where the source says

    def arrays(self) -> dict:
        """{name: array} of every weight."""
        return {k: np.asarray(v) for k, v in weight_arrays(self.model).items()}


def is_run(path: str | os.PathLike) -> bool:
    """Whether `path` is a detrax training run's workdir (not another project's folder of checkpoints)."""
    return os.path.isdir(path) and flax_detr.latest(os.fspath(path)) is None


WEIGHTS = ("auto", "best", "last", "raw")  # which weights of a run (`open_weights`)


def open_weights(path: str | os.PathLike, aids: bool = False, weights: str = "auto", **config_overrides) -> Opened:
    """The model at `path` and what it knows of its classes and val transform: the plain DETR that inference runs
    (`models.detr.plain`: a run's checkpoints and files saved before detrax wrote plain ones hold the
    training-only aids' weights too), or, with `aids`, every weight it holds (`--init`). `config_overrides` may
    change only what leaves the weights' shapes alone (dtype, attention kernel, dropout, dilation); the aids'
    fields at their defaults (`query_groups=1` ...) are what a plain DETR has.

    `weights` picks among a run's: `best` its best evaluated weights (`train.keep_best`), `last` its latest
    checkpoint's (their moving average where the run keeps one, `train.ema_decay`), `raw` the latest
    checkpoint's trained weights themselves, `auto` the best where the run kept one, else the last."""
    path = os.fspath(path)
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: one of {', '.join(WEIGHTS)}")
    asked = {k: config_overrides.pop(k) for k in AID_FIELDS if k in config_overrides}
    if asked and (aids or any(v != AID_DEFAULTS[k] for k, v in asked.items())):
        raise ValueError(f"{path}: a loaded model runs without the training-only aids ({asked} asked); a run's "
                         "checkpoints keep them for --resume, and --init takes them up")
    if is_run(path) and weights in ("auto", "best"):
        best = checkpoint.best_weights(path)
        if best is None and weights == "best":
            raise FileNotFoundError(f"{path}: the run kept no best weights (train with train.keep_best=AP50, or AP "
                                    "...); weights='last' takes its latest checkpoint's")
        if best is not None:
            path, weights = best[0], "auto"
    elif weights != "auto" and not is_run(path):
        raise ValueError(f"{path}: weights={weights!r} picks among a training run's weights; this is not a run's "
                         "workdir")
    opened = _open(path, weights == "raw", **config_overrides)
    if not aids:
        served = plain(opened.model)
        if served is not opened.model and opened.kind != "run":
            warnings.warn(f"{path}: holds the training-only aids' weights ({opened.model.config.query_groups} query "
                          "groups, denoising, encoder head); inference runs without them (dropped: save it again "
                          "for a file of the plain DETR)", stacklevel=3)
        opened.model = served
    return opened


def _open(path: str, raw: bool = False, **config_overrides) -> Opened:
    if is_run(path):
        model, meta = checkpoint.load_run(path, with_meta=True, ema=False if raw else None)
        if config_overrides:
            model = assemble(dataclasses.replace(model.config, **config_overrides), weight_arrays(model))  # eval mode
        categories = meta.get("categories") or [{"id": int(k), "name": v} for k, v in meta.get("names", {}).items()]
        return Opened(model, "run", categories, schema.from_dict(meta["config"]).data)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint (a run's workdir, a weights file or random:PRESET)")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: cannot be read (no read permission for this user)")
    path = flax_detr.latest(path) or path  # MasterSkepticista/detr's workdir: its newest checkpoint
    if files.is_detrax(path):
        meta = files.read_meta(path)
        data = schema.DataConfig(**meta["data"]) if "data" in meta else None
        return Opened(files.load_weights(path, **config_overrides), "detrax", meta.get("categories", []), data)
    model, report = convert.convert(convert.read_state_dict(path), **config_overrides)
    return Opened(model, report["format"], report["categories"] or [], None)


def read_init(path: str | os.PathLike) -> tuple[dict, tuple]:
    """({name: array} of the weights at `path`, the aids' included, and the category id of each class output
    when the weights name them: `class_ids`), for `--init`."""
    opened = open_weights(path, aids=True, weights="raw" if is_run(path) else "auto")  # a run: its state, as before
    return opened.arrays(), tuple(opened.model.config.class_ids)

