"""Weights of MasterSkepticista/detr, the JAX/Flax DETR detrax grew from: its msgpack checkpoints, read without
its code, and the key tables of its three trees.

A checkpoint is `flax.training.checkpoints`' msgpack of its `TrainState` (params, opt_state, global_step,
model_state {batch_stats}, rng, metadata), one file per step (`WORKDIR/checkpoint_<step>`). Its trees:
- `flax_detr`, its detector: `backbone/` in torchvision's names (conv kernels HWIO; batch-norm scale and bias in
  params, mean and var in batch_stats), `Conv_0` (input projection), `QueryPosEmbedding_0`,
  `transformer/{encoder,decoder}/{encoder,decoder}block_i` (`MultiHeadDotProductAttention_{0,1}` with per-head
  kernels, `MlpBlock_0`, `LayerNorm_k`), `transformer/LayerNorm_*` (the encoder norm when pre-norm, then the
  decoder's), `ObjectClassPredictor_0` (class 0 its background, class i its TFDS label i - 1) and
  `BBoxCoordPredictor_0`, shared by the decoder layers;
- `flax_resnet`, its backbone-only start (`artifacts/r50x1_i1k_torch`): the bare ResNet at the root (also as the
  `.npz` of "params/..." and "batch_stats/..." arrays that its `resnet.load` reads);
- `flax_bit`, its BiT ResNet (`root_block/conv_root`, `block{1-4}/unit{01..}`, `norm-pre-head`).

Its detector's forward differs from the official one in three ways, which a converted detector keeps in its
ModelConfig: LayerNorm epsilon 1e-6, the padding mask brought to the features by half-pixel nearest
(jax.image.resize), input mean (0.48, 0.456, 0.406). Its backbone computes in bfloat16, a compute choice, not a
weight: a converted model computes in float32 unless given dtype=bfloat16. Its BiT differs from BiT's release in
GroupNorm epsilon (1e-6, not 1e-5) and its max pool's padding (-inf, not zeros): a BiT tree fills detrax's BiT,
which keeps BiT's, as a start for training.
"""

from __future__ import annotations

import os
import re

import numpy as np

from detrax.data.coco_names import COCO_2017_IDS, COCO_NAMES
from detrax.models import keys
from detrax.models.backbones import registry as backbones

P, S = "params/", "batch_stats/"  # the flat keys of `read`: params/... and batch_stats/...
IGNORED = re.compile(r"^params/(fc|head)/(kernel|bias)$")  # an ImageNet classifier beside a backbone
FORWARD = dict(norm_eps=1e-6, mask_resize="half_pixel", pixel_mean=(0.48, 0.456, 0.406),
               pixel_std=(0.229, 0.224, 0.225))


def latest(path: str) -> str | None:
    """Its workdir -> the newest `checkpoint_<step>` file in it (as flax's restore_checkpoint picks); None for
    anything else (a file, or a detrax run: one with a `checkpoints/` folder)."""
    if not os.path.isdir(path) or os.path.isdir(os.path.join(path, "checkpoints")):
        return None
    steps = {int(m.group(1)): f for f in os.listdir(path) if (m := re.fullmatch(r"checkpoint_(\d+)", f))}
    return os.path.join(path, steps[max(steps)]) if steps else None


def read(path: str) -> dict[str, np.ndarray]:
    """A msgpack checkpoint (a TrainState dict, or a bare {params, batch_stats}) -> {"params/a/b": float32 array,
    "batch_stats/a/b": ...}; the optimizer state, step and RNG are left behind. Raises ValueError naming the
    file when it is not one."""
    from flax import serialization, traverse_util

    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises many kinds for a bad file
        raise ValueError(f"{path}: not a readable Flax msgpack checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("params"), dict):
        top = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{path}: a msgpack file without a `params` tree (a Flax TrainState has params, "
                         f"model_state, ...); it holds {top}")
    state = obj.get("model_state")
    stats = (state if isinstance(state, dict) else {}).get("batch_stats", obj.get("batch_stats")) or {}
    flat = {}
    for prefix, tree in ((P, obj["params"]), (S, stats)):
        for name, value in traverse_util.flatten_dict(tree, sep="/").items():
            try:
                flat[prefix + name] = np.asarray(value, np.float32)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {prefix}{name} is not an array ({type(value).__name__})") from None
    return flat


def recognise(sd) -> str | None:
    """Which of its trees a flat state dict holds (None: none of them)."""
    if f"{P}QueryPosEmbedding_0/query_emb" in sd:
        return "flax_detr"
    if f"{P}conv1/kernel" in sd and f"{P}layer1/0/conv1/kernel" in sd:
        return "flax_resnet"
    if f"{P}root_block/conv_root/kernel" in sd:
        return "flax_bit"
    return None


def config_fields(sd, fmt: str) -> dict:
    """The ModelConfig fields the weights of layout `fmt` fix."""
    if fmt == "flax_bit":
        depths = tuple(backbones.count(sd, rf"{P}block{i + 1}/unit(\d+)/") - 1 for i in range(4))  # units from 01
        if min(depths) <= 0:
            raise ValueError(f"no BiT ResNet found (units per block {depths})")
        return {"backbone": backbones.name_for("bit", depths), "depths": depths,
                "width": sd[f"{P}root_block/conv_root/kernel"].shape[-1]}
    root = f"{P}backbone/" if fmt == "flax_detr" else P
    depths = tuple(backbones.count(sd, rf"{re.escape(root)}layer{i + 1}/(\d+)/") for i in range(4))
    if 0 in depths or f"{root}conv1/kernel" not in sd:
        raise ValueError(f"no ResNet backbone found (blocks per stage {depths})")
    width = sd[f"{root}conv1/kernel"].shape[-1]
    found: dict = {"backbone": backbones.name_for("resnet", depths, width == 64), "depths": depths, "width": width}
    if fmt == "flax_detr":
        t = f"{P}transformer/"
        queries = sd[f"{P}QueryPosEmbedding_0/query_emb"]
        classes = sd[f"{P}ObjectClassPredictor_0/Dense_0/kernel"].shape[1] - 1  # its background excluded
        found.update(FORWARD, num_queries=queries.shape[0], hidden_dim=queries.shape[1], num_classes=classes,
                     class_ids=COCO_2017_IDS if classes == len(COCO_2017_IDS) else (),
                     num_heads=sd[f"{t}encoder/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"].shape[1],
                     enc_layers=backbones.count(sd, rf"{t}encoder/encoderblock_(\d+)/"),
                     dec_layers=backbones.count(sd, rf"{t}decoder/decoderblock_(\d+)/"),
                     ffn_dim=sd[f"{t}encoder/encoderblock_0/MlpBlock_0/Dense_0/kernel"].shape[1],
                     pre_norm=f"{t}LayerNorm_1/scale" in sd)
    return found


def categories(cfg) -> list[dict] | None:
    """The categories of a converted detector's class outputs (COCO's 80, by TFDS's label order), if known."""
    if tuple(cfg.class_ids) != COCO_2017_IDS:
        return None
    return [{"id": i, "name": COCO_NAMES[i]} for i in cfg.class_ids]


def table(cfg, fmt: str) -> dict:
    """The key table of layout `fmt`: detrax path -> (flat source key, transform)."""
    if fmt == "flax_bit":
        return _bit_table(cfg.depths)
    t = _resnet_table(cfg.depths, "backbone/" if fmt == "flax_detr" else "")
    if fmt == "flax_detr":
        t.update(_detector_table(cfg))
    return t


def _resnet_table(depths, root: str) -> dict:
    t = {}

    def conv_bn(dst_conv, dst_bn, src_conv, src_bn):
        t[f"{dst_conv}/kernel"] = (f"{P}{root}{src_conv}/kernel", keys.same)  # HWIO already
        for a in ("scale", "bias"):
            t[f"{dst_bn}/{a}"] = (f"{P}{root}{src_bn}/{a}", keys.same)
        for a in ("mean", "var"):
            t[f"{dst_bn}/{a}"] = (f"{S}{root}{src_bn}/{a}", keys.same)

    conv_bn("backbone/conv1", "backbone/bn1", "conv1", "bn1")
    for i, depth in enumerate(depths):
        for j in range(depth):
            dst, src = f"backbone/layer{i + 1}/{j}", f"layer{i + 1}/{j}"
            for k in range(1, 4):
                conv_bn(f"{dst}/conv{k}", f"{dst}/bn{k}", f"{src}/conv{k}", f"{src}/bn{k}")
            if j == 0:  # every stage's first block projects its shortcut
                conv_bn(f"{dst}/downsample_conv", f"{dst}/downsample_bn", f"{src}/downsample/0", f"{src}/downsample/1")
    return t


heads_in = lambda w: w.reshape(w.shape[0], -1) if w.ndim == 3 else w.reshape(-1)  # [D, H, d] -> [D, H*d]; bias
heads_out = lambda w: w.reshape(-1, w.shape[-1])  # [H, d, D] -> [H*d, D]
background_last = lambda w: np.concatenate([w[..., 1:], w[..., :1]], axis=-1)  # its class 0 -> detrax's last


def _detector_table(cfg) -> dict:
    t = {}

    def dense(dst, src, fn=keys.same):
        t[f"{dst}/kernel"] = (f"{P}{src}/kernel", fn)
        t[f"{dst}/bias"] = (f"{P}{src}/bias", heads_in if fn is heads_in else keys.same)

    def norm(dst, src):
        t[f"{dst}/scale"] = (f"{P}{src}/scale", keys.same)
        t[f"{dst}/bias"] = (f"{P}{src}/bias", keys.same)

    for kind, n in (("encoder", cfg.enc_layers), ("decoder", cfg.dec_layers)):
        for i in range(n):
            dst, src = f"transformer/{kind}/{i}", f"transformer/{kind}/{kind}block_{i}"
            attns = ["self_attn"] + (["cross_attn"] if kind == "decoder" else [])
            for a, a_dst in enumerate(attns):
                mha = f"{src}/MultiHeadDotProductAttention_{a}"
                for name, part in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                    dense(f"{dst}/{a_dst}/{name}", f"{mha}/{part}", heads_in)
                t[f"{dst}/{a_dst}/out_proj/kernel"] = (f"{P}{mha}/out/kernel", heads_out)
                t[f"{dst}/{a_dst}/out_proj/bias"] = (f"{P}{mha}/out/bias", keys.same)
            dense(f"{dst}/linear1", f"{src}/MlpBlock_0/Dense_0")
            dense(f"{dst}/linear2", f"{src}/MlpBlock_0/Dense_1")
            for k in range(len(attns) + 1):  # after (post-norm) or before (pre-norm) each sublayer
                norm(f"{dst}/norm{k + 1}", f"{src}/LayerNorm_{k}")
    if cfg.pre_norm:  # created in this order by its transformer: the encoder's norm, then the decoder's
        norm("transformer/encoder_norm", "transformer/LayerNorm_0")
    norm("transformer/decoder_norm", f"transformer/LayerNorm_{int(cfg.pre_norm)}")
    t["input_proj/kernel"] = (f"{P}Conv_0/kernel", lambda w: w[0, 0])  # [1, 1, C, D] -> [C, D]
    t["input_proj/bias"] = (f"{P}Conv_0/bias", keys.same)
    t["query_embed"] = (f"{P}QueryPosEmbedding_0/query_emb", keys.same)
    t["class_embed/kernel"] = (f"{P}ObjectClassPredictor_0/Dense_0/kernel", background_last)
    t["class_embed/bias"] = (f"{P}ObjectClassPredictor_0/Dense_0/bias", background_last)
    for k in range(3):
        dense(f"bbox_embed/layers/{k}", f"BBoxCoordPredictor_0/Dense_{k}")
    return t


def _bit_table(depths) -> dict:
    t = {"backbone/root/kernel": (f"{P}root_block/conv_root/kernel", keys.same)}

    def gn(dst, src):
        t[f"{dst}/scale"] = (f"{P}{src}/scale", keys.flat)
        t[f"{dst}/bias"] = (f"{P}{src}/bias", keys.flat)

    for i, depth in enumerate(depths):
        for j in range(depth):
            dst, src = f"backbone/block{i + 1}/{j}", f"block{i + 1}/unit{j + 1:02d}"
            for k in range(1, 4):
                gn(f"{dst}/gn{k}", f"{src}/gn{k}")
                t[f"{dst}/conv{k}/kernel"] = (f"{P}{src}/conv{k}/kernel", keys.same)
            if j == 0:  # every block's first unit projects its shortcut
                t[f"{dst}/downsample/kernel"] = (f"{P}{src}/conv_proj/kernel", keys.same)
    gn("backbone/norm", "norm-pre-head")
    return t
