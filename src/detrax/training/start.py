"""How a training run begins, decided in one place (`plan`): afresh, or from its workdir's latest checkpoint.

A fresh start builds the model from the seed, then copies `--init` weights into it or calibrates its frozen batch
norm (`initialise`), and records what it started from: the config, the `--init` path with a digest of its
weights, whether the batch norm was calibrated, and the training data. The record is written to `run.json` in
the workdir before the first step and travels in every checkpoint's meta.

`--resume` on a workdir with a checkpoint restores it and initialises nothing. On a workdir without one it is a
fresh start of the recorded run: the same config and `--init` weights (taken from the record when the command
line names none), so a run killed before its first checkpoint restarts exactly as it began. Either way, a
command line that contradicts the run (another config, other `--init` weights, other training data) is refused,
naming each difference, unless the caller allows changes; fields that do not change what is computed (how often
to log, evaluate, checkpoint, how many workers decode) may change freely.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from detrax.config import schema
from detrax.errors import ResumeConflict
from detrax.weights import files
from detrax.weights.opener import read_init

RECORD = "run.json"
FORMAT = "detrax-run/1"
# config fields that change nothing that is computed: free to differ between a run and its resumption
BOOKKEEPING = {"train.ckpt_every", "train.keep", "train.eval_every", "train.log_every", "train.max_bad_steps",
               "data.workers"}


@dataclasses.dataclass
class Start:
    """What `plan` decided."""

    restore: int | None  # the checkpoint step to continue from; None: a fresh start
    record: dict  # what the run started from (a fresh start completes it in `initialise`)
    message: str  # the run's first line: how it begins
    changes: list[str]  # differences from the run that the caller allowed
    expect_init: str | None = None  # a fresh start of a recorded run: the digest its --init weights must have
    init_weights: tuple | None = None  # (arrays, class_ids) of --init when the plan already read them


def plan(cfg: schema.Config, workdir: str, resume: bool, init: str | None, data: dict, ckpts,
         allow_changes: bool = False) -> Start:
    """Decide how the run in `workdir` begins. `data` describes the training split ({"path", "split",
    "images"}); `ckpts` is the workdir's `checkpoint.Checkpoints`."""
    latest = ckpts.latest_step()
    if latest is not None and not resume:
        raise ResumeConflict(f"{workdir} already holds a run (checkpoint of step {latest} in {ckpts.directory}): "
                             "--resume continues it; another --workdir starts a new run")
    if resume and latest is not None:
        meta = ckpts.meta(latest)
        record = meta.get("start") or {"config": meta["config"], "init": None, "calibration": None, "data": None}
        given = (init, read_init(init)[0]) if init is not None else None
        changes = _check(cfg, meta["config"], record, given, data, allow_changes, f"checkpoint {latest}")
        return Start(latest, record, f"resuming {workdir} from its checkpoint of step {latest}", changes)
    fresh = {"format": FORMAT, "config": schema.to_dict(cfg), "init": None, "calibration": None, "data": data}
    recorded = read_record(workdir) if resume else None
    if recorded is None:
        why = (f"--resume: no checkpoint and no run recorded in {workdir}: a new run" if resume else
               f"a new run in {workdir}")
        return Start(None, {**fresh, "init": {"path": init}} if init else fresh, why, [])
    loaded = read_init(init) if init is not None else None  # read once: checked here, used by `initialise`
    changes = _check(cfg, recorded["config"], recorded, loaded and (init, loaded[0]), data, allow_changes,
                     os.path.join(workdir, RECORD))
    started = recorded.get("init")
    path = init or (started or {}).get("path")
    record = {**fresh, "init": {"path": path} if path else None}
    expect = started.get("weights_sha256") if started and not (changes and init) else None
    how = (f"from {path}" if path else "from its seed") + (", batch norm calibrated" if recorded.get("calibration")
                                                         else "")
    return Start(None, record, f"--resume: no checkpoint in {workdir} yet: the run starts again from the "
                               f"beginning, exactly as recorded in {RECORD} ({how})", changes, expect, loaded)


def _check(cfg, recorded_cfg: dict, record: dict, given: tuple | None, data: dict, allow: bool, where: str) -> list:
    """The differences between this command line (`given`: its --init path and weights, or None) and the run;
    refused unless `allow`."""
    diffs = config_differences(recorded_cfg, schema.to_dict(cfg))
    started = record.get("init")
    if given is not None:
        init, digest = given[0], files.digest(given[1])
        if started is None:
            diffs.append(f"--init {init}: the run started without --init")
        elif started.get("weights_sha256") != digest:
            diffs.append(f"--init {init} (weights sha256 {digest[:12]}): the run started from {started['path']} "
                         f"(weights sha256 {str(started.get('weights_sha256'))[:12]})")
    was = record.get("data")
    if was and (was["split"], was["images"]) != (data["split"], data["images"]):
        diffs.append(f"training data: split {data['split']!r} of {data['images']} images in {data['path']}; the run "
                     f"trained on split {was['split']!r} of {was['images']} images in {was['path']}")
    if diffs and not allow:
        raise ResumeConflict(f"--resume: this command line contradicts the run recorded in {where}:\n  "
                             + "\n  ".join(diffs) + "\nrun the same command as the run, or pass --allow-changes to "
                             "resume with these changes (they are recorded in metrics.jsonl)")
    return diffs


def config_differences(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every field that differs (bookkeeping fields and the preset's name aside). A field
    that this version of detrax lacks (a run recorded by another version) is a difference too."""
    valid = set(_flat(new))
    known = {k: {f: v for f, v in fields.items() if f"{k}.{f}" in valid} if isinstance(fields, dict) else fields
             for k, fields in old.items()}
    gone = sorted(set(_flat(old)) - set(_flat(known)))
    old, new = _flat(schema.to_dict(schema.from_dict(known))), _flat(new)
    return [f"{k}: {old.get(k)!r} in the run, {new.get(k)!r} now" for k in sorted(set(old) | set(new))
            if k not in BOOKKEEPING and k != "name" and old.get(k) != new.get(k)] + [
        f"{k}: recorded by another version of detrax, which had this setting; this one has not" for k in gone]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def initialise(model, start: Start, records, cfg: schema.Config, allow_changes: bool = False,
               log: Callable[[str], None] | None = None) -> list[str]:
    """A fresh start: `--init` weights into `model` (the class head may differ and is then left fresh), or its
    frozen batch norm calibrated on the first training images; then, with `train.crop_steps`, the backbone's
    warm-up on the training objects (`crop_warmup.py`); completes `start.record`. Returns notes, each also
    given to `log` as it comes (the warm-up takes minutes)."""
    from detrax.models.backbones import registry as backbones

    notes, init = [], start.record.get("init")

    def note(line: str) -> None:
        notes.append(line)
        if log is not None:
            log(line)

    if init:
        arrays, class_ids = start.init_weights or read_init(init["path"])
        init["weights_sha256"] = digest = files.digest(arrays)
        if start.expect_init and digest != start.expect_init and not allow_changes:
            raise ResumeConflict(f"--resume: {init['path']} now holds other weights (sha256 {digest[:12]}) than the "
                                 f"run started from (sha256 {start.expect_init[:12]}); give --init the run's "
                                 "weights, or pass --allow-changes to start it again from these")
        init["fresh"] = fresh = files.init_from(model, arrays, init["path"], class_ids)
        note(f"initialised from {init['path']} (weights sha256 {digest[:12]})"
             + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
    elif cfg.train.calibrate_bn and backbones.get(cfg.model.backbone).calibrates:
        n = min(len(records), 4 * cfg.train.batch_size)
        calibrate(model, records[:n], cfg.data)
        start.record["calibration"] = {"images": n}
        note(f"frozen batch norm calibrated on {n} images")
    if cfg.train.crop_steps:
        from detrax.training.crop_warmup import warm_up

        start.record["crop_warmup"] = warm_up(model, records, cfg, note)
    return notes


def calibrate(model, records, dc: schema.DataConfig) -> None:
    """Frozen batch-norm statistics from a batch of training images (val transform): a from-scratch backbone
    starts normalised instead of with activations that grow by orders of magnitude per stage."""
    from detrax.data.batching import Collate
    from detrax.data.loader import Augment
    from detrax.data.transforms import normalize_batch

    augment = Augment(False, dc)
    batch = Collate(dc.max_targets, dc.bucket_step)([augment(r) for r in records])  # one batch, all images
    pixels = normalize_batch(batch["pixels"], batch["mask"], model.config.pixel_mean, model.config.pixel_std)
    model.backbone.stages(pixels, batch["mask"], calibrate=True)


def resolve_classes(cfg: schema.Config, train_ds, workdir: str, resume: bool) -> tuple[schema.Config, list[str]]:
    """The config with `model.num_classes` a number: `auto` follows the training data (its largest category id
    + 1) on a fresh start and keeps the run's own on `--resume`; an explicit number stays. Fails, naming the
    annotation file, when the data's category ids do not fit. Returns (config, notes)."""
    where = train_ds.annotation_file or train_ds.root
    if cfg.model.class_ids:
        raise ValueError(f"model.class_ids={cfg.model.class_ids[:4]}...: training reads class i as category id i "
                         "(detrax's layout); leave class_ids empty (--init maps such weights' outputs by their ids)")
    n, notes = cfg.model.num_classes, []
    if n == "auto":
        recorded = recorded_config(workdir) if resume else None
        if recorded is not None:
            n = recorded["model"]["num_classes"]
        else:
            n = train_ds.num_classes
            notes.append(f"model.num_classes={n} from the training data ({len(train_ds.names)} categories, ids up "
                         f"to {n - 1})")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=n))
    if train_ds.num_classes > n:
        raise ValueError(f"{where}: category ids reach {train_ds.num_classes - 1}; set model.num_classes="
                         f"{train_ds.num_classes} (it is {n}), or model.num_classes=auto to follow the data")
    return cfg, notes


def recorded_config(workdir: str) -> dict | None:
    """The config of the run in `workdir` (its latest checkpoint's, else its start record's), or None."""
    from detrax.weights.checkpoint import Checkpoints

    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        ckpts = Checkpoints(workdir, read_only=True)
        try:
            latest = ckpts.latest_step()
            if latest is not None:
                return ckpts.meta(latest)["config"]
        finally:
            ckpts.close()
    record = read_record(workdir)
    return record["config"] if record else None


def read_record(workdir: str) -> dict | None:
    path = os.path.join(workdir, RECORD)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ResumeConflict(f"{path}: the run's start record cannot be read ({e}); move it away to start the run "
                             "afresh") from None
    if record.get("format") != FORMAT:
        raise ResumeConflict(f"{path}: not a detrax run record (format {record.get('format')!r})")
    return record


def write_record(workdir: str, record: dict) -> None:
    """`run.json`, atomically (each host writes its own temporary file)."""
    import jax

    path = os.path.join(workdir, RECORD)
    tmp = f"{path}.tmp{jax.process_index()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
