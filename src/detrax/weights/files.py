"""Weights files: detrax's own format (one `.safetensors` file that carries its model config in the metadata),
what any weights file is, told by its content rather than its name, and weights into a model (`init_from`).
Opening any weights path is `weights.open`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zipfile

import numpy as np

from detrax.config.schema import ModelConfig, model_config_from_dict, model_config_to_json
from detrax.models.detr import AID_WEIGHTS, DETR, assemble, weight_arrays

FORMAT = "detrax/1"
KINDS = ("safetensors", "npz", "torch", "msgpack")


def file_kind(path: str | os.PathLike) -> str:
    """What a weights file is, from its first bytes: `safetensors` (a little-endian header length, then a JSON
    header), `npz` (a zip of `.npy` arrays), `torch` (torch.save's zip, or its older pickle) or `msgpack` (Flax's
    serialization: a map). Raises ValueError naming the file when it is none of these."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path}: not a readable .npz or torch archive (a damaged zip: {e})") from None
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise ValueError(f"{path}: a zip archive that is neither torch.save's nor numpy's .npz "
                         f"(first members: {names[:3]})")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch"  # a pickle: torch.save's legacy format
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    raise ValueError(f"{path}: not a weights file detrax knows (safetensors, torch .pth/.bin, .npz or Flax "
                     f"msgpack); it begins with {head[:8]!r}")


def is_detrax(path: str | os.PathLike) -> bool:
    """Whether `path` is a weights file of detrax's own format, whatever its name."""
    try:
        if file_kind(path) != "safetensors":
            return False
        model_config(path)
    except ValueError:
        return False
    return True


def save_weights(model: DETR, path: str | os.PathLike, categories: list | None = None,
                 data: dict | None = None) -> None:
    """Every weight of `model` (trained and frozen) and its config, written atomically; `categories` ([{id,
    name}] of its class outputs) and `data` ({val_size, max_size, bucket_step}: the val transform it was trained
    at) travel alongside for `detrax.load`."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    arrays = {k: np.asarray(v) for k, v in weight_arrays(model).items()}
    meta = {"format": FORMAT, "config": model_config_to_json(model.config)}
    meta.update({k: json.dumps(v) for k, v in (("categories", categories), ("data", data)) if v})
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(arrays, tmp, metadata=meta)
    os.replace(tmp, path)


def _metadata(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a detrax weights file (metadata format {meta.get('format')!r}); "
                         "convert other checkpoints with `detrax convert`")
    return meta


def model_config(path: str | os.PathLike) -> ModelConfig:
    """The model config a detrax weights file carries."""
    return model_config_from_dict(json.loads(_metadata(path)["config"]))


def read_meta(path: str | os.PathLike) -> dict:
    """What a detrax weights file says beside its config: `categories` and `data` (see `save_weights`)."""
    meta = _metadata(path)
    return {k: json.loads(meta[k]) for k in ("categories", "data") if k in meta}


def load_weights(path: str | os.PathLike, **config_overrides) -> DETR:
    """A DETR in eval mode with the weights of `path`. Overrides may change only what leaves the weights'
    shapes alone (dtype, attention kernel, dropout, dilation)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    cfg = dataclasses.replace(model_config(path), **config_overrides)
    try:
        return assemble(cfg, load_file(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def digest(arrays: dict) -> str:
    """sha256 over the names, shapes, dtypes and bytes of the weights, in name order: the same weights give the
    same digest whatever file format carried them."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.shape}:{a.dtype};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


_FRESH_IF_ABSENT = (*AID_WEIGHTS, "mask_head/", "bbox_attention/")
_PER_CLASS = ("class_embed", "denoising/label_embed", "encoder_head/class_embed/")  # fresh for another class count


def init_from(model, source: dict, path: str, class_ids=()) -> list[str]:
    """Copy the weights `source` ({name: array}, read from `path`) into `model` where the shapes agree. The class
    head may differ (another number of classes) and is then left freshly initialised (so are the training-only
    aids' per-class weights), unless `class_ids` (the category id of each source class output, as
    MasterSkepticista/detr's 80 COCO classes) all fit this model's head (whose output i is category i): then each
    output moves to its id, and the ids the source has no output for stay fresh. A mask head the source lacks (a
    detector's weights: the panoptic recipe's second stage) stays fresh too. Returns the names left fresh (wholly
    or in part)."""
    from flax import nnx

    from detrax.models.detr import WEIGHTS

    fresh, arrays = [], {}
    n = int(model.config.num_classes)
    by_id = len(class_ids) > 0 and not model.config.class_ids and max(class_ids) < n
    for name, value in weight_arrays(model).items():
        src = source.get(name)
        if by_id and name.startswith("class_embed") and src is not None:
            cols = [*class_ids, n]  # the source's outputs, no-object last, to theirs here
            arrays[name] = np.asarray(value).copy()
            arrays[name][..., cols] = src
            fresh.append(f"{name} (outputs of {n + 1 - len(cols)} ids without a source class)")
        elif src is not None and src.shape == value.shape:
            arrays[name] = src
        elif name.startswith(_PER_CLASS) or (src is None and name.startswith(_FRESH_IF_ABSENT)):
            arrays[name] = value  # another class count; a detector's weights for a model with a mask head, or
            # without the training-only weights
            fresh.append(name)
        else:
            raise ValueError(f"{path}: weight {name} is {None if src is None else src.shape}, this model needs "
                             f"{value.shape}")
    nnx.update(model, nnx.state(assemble(model.config, arrays, init_rest=True), WEIGHTS))
    head = [f for f in fresh if f.startswith(("mask_head/", "bbox_attention/"))]
    return [f for f in fresh if f not in head] + ([f"the mask head ({len(head)} weights)"] if head else [])
