"""Weights out to the PyTorch world: a detrax DETR (trained here or imported) as an official DETR checkpoint
(`{'model': state_dict, 'args': ...}` for facebookresearch/detr's `build_model`; DETRsegm for a mask model) or a
Hugging Face folder (`config.json` and `model.safetensors`, for `DetrForObjectDetection.from_pretrained` or
`DetrForSegmentation`). The key tables are `convert`'s, read backwards (`keys.torch_layout`): every weight
written, none left over, so that official -> detrax -> official is bitwise."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from detrax.models import keys
from detrax.models import mask_head as segmentation
from detrax.models.detr import DETR, plain, weight_arrays
from detrax.weights.convert import hf_table, official_table

FORMATS = ("official", "hf")


def _check(model: DETR, fmt: str) -> None:
    c = model.config
    faults = [] if c.backbone.startswith("resnet") else [f"its backbone is {c.backbone}, not a torchvision ResNet"]
    if fmt == "hf" and c.pre_norm:
        faults.append("pre-norm (HF DETR is post-norm only)")
    if fmt == "hf" and c.dilation:
        faults.append("DC5 (HF DETR's own ResNet has no dilation)")
    if faults:
        raise ValueError(f"this model has no {fmt} layout: {'; '.join(faults)}")


def _arrays(model: DETR, table: dict, fmt: str) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v, np.float32) for k, v in weight_arrays(model).items()}
    left = sorted(set(arrays) - set(table))
    if left:
        raise ValueError(f"weights with no place in the {fmt} layout ({len(left)}): {', '.join(left[:8])}")
    return keys.torch_layout(table, arrays)


def official_state_dict(model: DETR) -> dict[str, np.ndarray]:
    """The official DETR's (DETRsegm's, for a mask model) state dict of `model`'s plain DETR."""
    model = plain(model)
    _check(model, "official")
    table = official_table(model.config)
    if model.config.masks:
        table = {dst: (f"detr.{src}", fn) for dst, (src, fn) in table.items()} | segmentation.weights_table([])
    return _arrays(model, table, "official")


def official_args(model: DETR) -> argparse.Namespace:
    """The arguments of facebookresearch/detr's `build_model` that this model matches (`num_classes` is the
    one its class head has; the official `build` takes it from `dataset_file`)."""
    c = model.config
    return argparse.Namespace(backbone=c.backbone, dilation=c.dilation, position_embedding="sine",
                              hidden_dim=c.hidden_dim, nheads=c.num_heads, dim_feedforward=c.ffn_dim,
                              enc_layers=c.enc_layers, dec_layers=c.dec_layers, num_queries=c.num_queries,
                              pre_norm=c.pre_norm, dropout=c.dropout, masks=c.masks, aux_loss=True,
                              num_classes=int(c.num_classes))


def hf_config(model: DETR, names: dict | None = None):
    """transformers' DetrConfig of this model: HF's own ResNet backbone (no timm, no download), `id2label` from
    `names` ({id: name}) where given."""
    import transformers

    c = model.config
    stages = len(c.depths)
    resnet: dict[str, Any] = dict(depths=list(c.depths), embedding_size=c.width,
                                  hidden_sizes=[c.width * 4 * 2**i for i in range(stages)],
                                  out_features=[f"stage{i + 1}" for i in range(stages)][0 if c.masks else -1:])
    labels = {i: (names or {}).get(i, f"LABEL_{i}") for i in range(int(c.num_classes))}
    detr: dict[str, Any] = dict(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config=transformers.ResNetConfig(**resnet), num_labels=int(c.num_classes), id2label=labels,
        label2id={v: k for k, v in labels.items()}, d_model=c.hidden_dim, encoder_layers=c.enc_layers,
        decoder_layers=c.dec_layers, encoder_ffn_dim=c.ffn_dim, decoder_ffn_dim=c.ffn_dim,
        encoder_attention_heads=c.num_heads, decoder_attention_heads=c.num_heads, num_queries=c.num_queries,
        dropout=c.dropout, auxiliary_loss=False)
    return transformers.DetrConfig(**detr)


def hf_model(model: DETR, names: dict | None = None):
    """A transformers DetrForObjectDetection (DetrForSegmentation for a mask model) holding `model`'s plain DETR,
    in eval mode: the installed transformers' own names (4 or 5), every tensor filled (strict)."""
    import torch
    import transformers

    model = plain(model)
    _check(model, "hf")
    cls = transformers.DetrForSegmentation if model.config.masks else transformers.DetrForObjectDetection
    with torch.device("meta"):
        empty = cls(hf_config(model, names))
    names_there = list(empty.state_dict())
    det = [k.removeprefix("detr.") for k in names_there]
    table = hf_table(model.config, det)
    if model.config.masks:
        table = {dst: (f"detr.{src}", fn) for dst, (src, fn) in table.items()} | segmentation.weights_table(
            names_there)
    sd = {k: torch.from_numpy(v) for k, v in _arrays(model, table, "hf").items()}
    out = cls(hf_config(model, names)).eval()
    missing, unexpected = out.load_state_dict(sd, strict=False)
    left = [k for k in missing if not k.endswith("num_batches_tracked")]
    if left or unexpected:
        raise ValueError(f"HF layout: tensors left unfilled {left[:8]}, unknown {unexpected[:8]}")
    return out


def write(model: DETR, out: str | os.PathLike, fmt: str, names: dict | None = None) -> str:
    """Write `model` to `out` in `fmt` (official: one torch file; hf: a folder). Returns what was written."""
    out = os.fspath(out)
    if fmt == "official":
        import torch

        sd = {k: torch.from_numpy(v) for k, v in official_state_dict(model).items()}
        tmp = f"{out}.tmp{os.getpid()}"
        torch.save({"model": sd, "args": official_args(model)}, tmp)
        os.replace(tmp, out)
        return out
    if fmt == "hf":
        hf_model(model, names).save_pretrained(out)
        return os.path.join(out, "model.safetensors")
    raise ValueError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
