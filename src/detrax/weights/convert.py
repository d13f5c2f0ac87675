"""Weights in: official DETR and DETRsegm, Hugging Face DetrForObjectDetection and DetrForSegmentation,
torchvision ResNet, BiT (.npz) and the Flax checkpoints of MasterSkepticista/detr (its detector, ResNet and BiT
trees; see `flax_detr`) -> detrax.

Each source has an explicit key table, target path -> (source key, transform), built below. Conversion fails,
naming the keys, when a source key is left unused or a parameter is left unfilled, and names both shapes when
they differ. The only source keys passed over are listed in IGNORED (BN counters, ImageNet classifiers).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import zipfile

import numpy as np
from flax import nnx

from detrax.config.schema import ModelConfig
from detrax.models import keys
from detrax.models import mask_head as segmentation
from detrax.models.backbones import registry as backbones
from detrax.models.backbones.resnet import weights_table as resnet_table
from detrax.models.detr import WEIGHTS, abstract, assemble
from detrax.models.detr import path_key as model_path_key
from detrax.weights import files, flax_detr

IGNORED = re.compile(r"(.*\.num_batches_tracked$)|(^fc\.(weight|bias)$)|(^resnet/head/conv2d/(kernel|bias)$)")


class ConversionError(ValueError):
    pass


def official_table(cfg: ModelConfig, prefix="backbone.0.body.") -> dict:
    t = resnet_table(cfg.depths, prefix)
    d = cfg.hidden_dim
    for kind, n in (("encoder", cfg.enc_layers), ("decoder", cfg.dec_layers)):
        for i in range(n):
            dst, src = f"transformer/{kind}/{i}", f"transformer.{kind}.layers.{i}"
            attns = [("self_attn", "self_attn")] + ([("cross_attn", "multihead_attn")] if kind == "decoder" else [])
            for a_dst, a_src in attns:
                for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
                    rows = slice(j * d, (j + 1) * d)
                    t[f"{dst}/{a_dst}/{name}/kernel"] = (f"{src}.{a_src}.in_proj_weight", keys.Rows(rows, True))
                    t[f"{dst}/{a_dst}/{name}/bias"] = (f"{src}.{a_src}.in_proj_bias", keys.Rows(rows, False))
                keys.dense(t, f"{dst}/{a_dst}/out_proj", f"{src}.{a_src}.out_proj")
            keys.dense(t, f"{dst}/linear1", f"{src}.linear1")
            keys.dense(t, f"{dst}/linear2", f"{src}.linear2")
            for k in range(3 if kind == "decoder" else 2):
                keys.norm(t, f"{dst}/norm{k + 1}", f"{src}.norm{k + 1}")
    if cfg.pre_norm:
        keys.norm(t, "transformer/encoder_norm", "transformer.encoder.norm")
    keys.norm(t, "transformer/decoder_norm", "transformer.decoder.norm")
    t["input_proj/kernel"] = ("input_proj.weight", keys.conv1x1)
    t["input_proj/bias"] = ("input_proj.bias", keys.same)
    t["query_embed"] = ("query_embed.weight", keys.same)
    keys.dense(t, "class_embed", "class_embed")
    for k in range(3):
        keys.dense(t, f"bbox_embed/layers/{k}", f"bbox_embed.layers.{k}")
    return t


def hf_table(cfg: ModelConfig, names) -> dict:
    """HF DetrForObjectDetection, in the names of transformers 4 (hub files: `backbone.conv_encoder`,
    `out_proj`, `fc1`) and of transformers 5 (`backbone.model`, `o_proj`, `mlp.fc1`), timm or HF ResNet."""
    names = set(names)
    bb = "model.backbone.conv_encoder.model." if any(k.startswith("model.backbone.conv_encoder.") for k in names) \
        else "model.backbone.model."
    t = resnet_table(cfg.depths, bb, hf=f"{bb}embedder.embedder.convolution.weight" in names)
    v5 = "model.encoder.layers.0.self_attn.o_proj.weight" in names
    out, fc = ("o_proj", "mlp.fc") if v5 else ("out_proj", "fc")
    for kind, n in (("encoder", cfg.enc_layers), ("decoder", cfg.dec_layers)):
        for i in range(n):
            dst, src = f"transformer/{kind}/{i}", f"model.{kind}.layers.{i}"
            attns = [("self_attn", "self_attn")] + ([("cross_attn", "encoder_attn")] if kind == "decoder" else [])
            for a_dst, a_src in attns:
                for name in ("q_proj", "k_proj", "v_proj"):
                    keys.dense(t, f"{dst}/{a_dst}/{name}", f"{src}.{a_src}.{name}")
                keys.dense(t, f"{dst}/{a_dst}/out_proj", f"{src}.{a_src}.{out}")
            keys.dense(t, f"{dst}/linear1", f"{src}.{fc}1")
            keys.dense(t, f"{dst}/linear2", f"{src}.{fc}2")
            norms = ["self_attn_layer_norm"] + (["encoder_attn_layer_norm"] if kind == "decoder" else [])
            for k, name in enumerate(norms + ["final_layer_norm"]):
                keys.norm(t, f"{dst}/norm{k + 1}", f"{src}.{name}")
    keys.norm(t, "transformer/decoder_norm", "model.decoder.layernorm")
    t["input_proj/kernel"] = ("model.input_projection.weight", keys.conv1x1)
    t["input_proj/bias"] = ("model.input_projection.bias", keys.same)
    t["query_embed"] = ("model.query_position_embeddings.weight", keys.same)
    keys.dense(t, "class_embed", "class_labels_classifier")
    for k in range(3):
        keys.dense(t, f"bbox_embed/layers/{k}", f"bbox_predictor.layers.{k}")
    return t


# ----------------------------------------------------------------------------------------- reading sources

def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat {key: float32 array} from a `.safetensors` file (no torch needed), a torch file (`.pth`, `.pt`,
    `.bin`) or an `.npz` archive (BiT's release format), told apart by their content, not their names."""
    path = os.fspath(path)
    if os.path.isdir(path):
        newest = flax_detr.latest(path)  # MasterSkepticista/detr's workdir: its newest checkpoint_<step>
        if newest is None:
            raise ConversionError(f"{path}: a directory, not a weights file (a detrax training run loads with "
                                  "detrax.load; MasterSkepticista/detr's workdir holds checkpoint_<step> files)")
        path = newest
    try:
        kind = files.file_kind(path)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such file") from None
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if kind == "msgpack":
        try:
            return flax_detr.read(path)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    if kind == "npz":
        try:
            with np.load(path) as z:
                return {k: np.asarray(z[k], np.float32) for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise ConversionError(f"{path}: not a readable .npz archive ({e})") from None
    if kind == "safetensors":
        from safetensors.numpy import load_file
        return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading a torch file needs PyTorch: pip install 'detrax[torch]'") from None
    torch.serialization.add_safe_globals([argparse.Namespace])  # the official checkpoints carry their args
    try:
        with open(path, "rb") as f:  # a file object: torch would go by a .safetensors name
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
        raise ConversionError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # the official {'model': state_dict, 'optimizer': ..., 'args': ...}
    if not isinstance(obj, dict) or not all(hasattr(v, "numpy") for v in obj.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors (or {{'model': state_dict}})")
    return {k: v.detach().float().numpy() for k, v in obj.items()}


def checkpoint_layout(sd) -> str:
    """Which DETR or backbone layout a state dict has: official, hf, or a registered backbone's weights format."""
    if any(k.startswith("backbone.0.body.") for k in sd) or "query_embed.weight" in sd:
        return "official"
    if "class_labels_classifier.weight" in sd or any(k.startswith("model.backbone.") for k in sd):
        return "hf"
    if (flax := flax_detr.recognise(sd)) is not None:
        return flax
    for fmt in _backbone_formats():  # a backbone's published weights: torchvision ResNet, BiT, registered ones
        if fmt.recognise(sd):
            return fmt.name
    known = ", ".join(["official DETR", "HF DETR", *(f.name for f in _backbone_formats()),
                       "MasterSkepticista/detr's detector, ResNet or BiT"])
    raise ConversionError(f"unrecognised checkpoint layout (not one of: {known}); first keys: {sorted(sd)[:5]}")


def _backbone_formats() -> list[backbones.WeightsFormat]:
    return [b.weights for b in backbones.FAMILIES.values() if b.weights is not None]


def _backbone_format(name: str) -> backbones.WeightsFormat | None:
    return next((f for f in _backbone_formats() if f.name == name), None)


_count = backbones.count


def infer_config(sd, fmt: str, base: ModelConfig, **overrides) -> ModelConfig:
    """What the weights fix (depths, widths, layer counts, classes, queries); the rest from `base`."""
    names = list(sd)
    if fmt.startswith("flax_"):
        try:
            return dataclasses.replace(base, **{**flax_detr.config_fields(sd, fmt), **overrides})
        except ValueError as e:
            raise ConversionError(f"{fmt} checkpoint: {e}") from None
    backbone_format = _backbone_format(fmt)
    if backbone_format is not None:
        try:
            return dataclasses.replace(base, **{**backbone_format.config_fields(sd), **overrides})
        except ValueError as e:
            raise ConversionError(f"{fmt} checkpoint: {e}") from None
    bb = r"backbone\.0\.body\." if fmt == "official" else r"model\.backbone\.(?:conv_encoder\.)?model\."
    hf_resnet = any(re.match(bb + "encoder.stages", k) for k in names)
    if hf_resnet:
        depths = tuple(_count(names, bb + rf"encoder\.stages\.{i}\.layers\.(\d+)\.") for i in range(4))
    else:
        depths = tuple(_count(names, bb + rf"layer{i + 1}\.(\d+)\.") for i in range(4))
    stem = next((k for k in names if re.match(bb + r"(conv1|embedder\.embedder\.convolution)\.weight$", k)), None)
    if stem is None or 0 in depths:
        raise ConversionError(f"no ResNet backbone found in the {fmt} checkpoint (depths {depths})")
    width = sd[stem].shape[0]
    found = dict(backbone=backbones.name_for("resnet", depths, width == 64), depths=depths, width=width)
    if fmt == "official":
        found.update(num_classes=sd["class_embed.weight"].shape[0] - 1,
                     num_queries=sd["query_embed.weight"].shape[0], hidden_dim=sd["query_embed.weight"].shape[1],
                     enc_layers=_count(names, r"transformer\.encoder\.layers\.(\d+)\."),
                     dec_layers=_count(names, r"transformer\.decoder\.layers\.(\d+)\."),
                     ffn_dim=sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
                     pre_norm="transformer.encoder.norm.weight" in sd)
    elif fmt == "hf":
        fc1 = next(k for k in names if re.match(r"model\.encoder\.layers\.0\.(mlp\.)?fc1\.weight$", k))
        found.update(num_classes=sd["class_labels_classifier.weight"].shape[0] - 1,
                     num_queries=sd["model.query_position_embeddings.weight"].shape[0],
                     hidden_dim=sd["model.query_position_embeddings.weight"].shape[1],
                     enc_layers=_count(names, r"model\.encoder\.layers\.(\d+)\."),
                     dec_layers=_count(names, r"model\.decoder\.layers\.(\d+)\."), ffn_dim=sd[fc1].shape[0])
    found.update(overrides)
    return dataclasses.replace(base, **found)


def convert(sd: dict, base: ModelConfig | None = None, *, seed: int = 0, **overrides):
    """A state dict -> (DETR model in eval mode, report dict). `overrides` set config fields that the weights
    cannot tell (`dilation`, `num_heads`, `dtype`, ...). A torchvision ResNet or a BiT .npz fills the backbone
    only; the rest is freshly initialised from `seed`."""
    masks = any(k.startswith(("mask_head.", "bbox_attention.")) for k in sd)  # DETRsegm: the detector under detr.
    det = {k.removeprefix("detr."): v for k, v in sd.items() if k.startswith("detr.")} if masks else sd
    fmt = checkpoint_layout(det)
    if masks and fmt not in ("official", "hf"):
        raise ConversionError(f"a mask head over a {fmt} detector: only official and HF segmentation models convert")
    cfg = infer_config(det, fmt, base or ModelConfig(), **({"masks": True} if masks else {}) | overrides)
    cfg = cfg.with_classes()  # a backbone alone: COCO's
    if fmt == "official":
        table = official_table(cfg)
    elif fmt == "hf":
        if cfg.pre_norm:
            raise ConversionError("HF DETR has no pre-norm variant")
        table = hf_table(cfg, det)
    elif fmt.startswith("flax_"):
        table = flax_detr.table(cfg, fmt)
    else:
        backbone_format = _backbone_format(fmt)
        assert backbone_format is not None, fmt  # detect named a backbone's format
        table = backbone_format.table(cfg)
    if masks:
        table = {dst: (f"detr.{src}", fn) for dst, (src, fn) in table.items()} | segmentation.weights_table(sd)
    backbone_only = fmt not in ("official", "hf", "flax_detr")
    shapes = {model_path_key(p): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract(cfg, seed), WEIGHTS))}
    assert not set(table) - set(shapes), f"key table names unknown weights: {sorted(set(table) - set(shapes))[:5]}"
    missing = sorted(k for k in {src for src, _ in table.values()} if k not in sd)
    unused = sorted(k for k in set(sd) - {src for src, _ in table.values()}
                    if not IGNORED.match(k) and not flax_detr.IGNORED.match(k))
    unfilled = sorted(set(shapes) - set(table)) if not backbone_only else sorted(
        k for k in set(shapes) - set(table) if k.startswith("backbone/"))
    if missing or unused or unfilled:
        raise ConversionError("; ".join(f"{what} ({len(ks)}): {', '.join(ks[:8])}{' ...' if len(ks) > 8 else ''}"
                                        for what, ks in (("source keys missing", missing),
                                                         ("source keys left unused", unused),
                                                         ("parameters left unfilled", unfilled)) if ks))
    arrays, sources = {}, {}
    for dst, (src, fn) in table.items():
        try:
            arrays[dst] = np.asarray(fn(sd[src]), np.float32)
        except (IndexError, ValueError) as e:
            raise ConversionError(f"{src} has shape {tuple(sd[src].shape)}, unusable for {dst} "
                                  f"(shape {tuple(shapes[dst])}): {e}") from None
        sources[dst] = f"{src} {tuple(sd[src].shape)}"
    try:
        model = assemble(cfg, arrays, seed=seed, init_rest=backbone_only, sources=sources)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return model, {"format": fmt, "config": cfg, "filled": len(table), "fresh": sorted(set(shapes) - set(table)),
                   "categories": flax_detr.categories(cfg)}


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, data: dict | None = None, **overrides) -> dict:
    """Read `src` (any layout above, told by content), convert, write detrax weights to `dst`, with the categories
    of its class outputs where the source knows them and `data` ({val_size, max_size, bucket_step}: the val
    transform the weights were trained at, for `detrax.load`) when given.

    DC5 cannot be read off the weights: it is taken from `dilation=`, else from a file name holding "dc5"
    (as the official detr-r50-dc5-*.pth), and the report says which.
    """
    sd = read_state_dict(src)
    if "dilation" not in overrides and "dc5" in os.path.basename(os.fspath(src)).lower():
        overrides["dilation"] = True
    model, report = convert(sd, **overrides)
    files.save_weights(model, dst, categories=report["categories"], data=data)
    return report
