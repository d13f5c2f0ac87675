"""Model weights to and from one `.safetensors` file that carries its model config in the metadata."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from detrax.configs import ModelConfig, model_config_from_dict, model_config_to_json
from detrax.model import DETR, assemble, weight_arrays

FORMAT = "detrax/1"


def save_weights(model: DETR, path: str | os.PathLike) -> None:
    """Every weight of `model` (trained and frozen) and its config, written atomically."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    arrays = {k: np.asarray(v) for k, v in weight_arrays(model).items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(arrays, tmp, metadata={"format": FORMAT, "config": model_config_to_json(model.config)})
    os.replace(tmp, path)


def read_config(path: str | os.PathLike) -> ModelConfig:
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
    return model_config_from_dict(json.loads(meta["config"]))


def load_weights(path: str | os.PathLike, **config_overrides) -> DETR:
    """A DETR in eval mode with the weights of `path`. Overrides may change only what leaves the weights'
    shapes alone (dtype, attention kernel, dropout, dilation)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    cfg = dataclasses.replace(read_config(path), **config_overrides)
    try:
        return assemble(cfg, load_file(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
