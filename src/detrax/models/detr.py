"""DETR: backbone -> 1x1 input projection -> transformer -> class and box heads on every decoder layer."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from detrax.config.schema import ModelConfig
from detrax.models.backbones import registry as backbones
from detrax.models.backbones.resnet import Frozen
from detrax.models.denoising import Denoising
from detrax.models.encoder_head import EncoderHead
from detrax.models.mask_head import MaskHead, MHAttentionMap
from detrax.models.position_encoding import resize_mask, sine_position_embedding
from detrax.models.transformer import Transformer

WEIGHTS = (nnx.Param, Frozen)  # what a checkpoint holds: trained parameters and frozen ones
# the training-only aids (Group DETR's extra queries, DN-DETR's denoising, the encoder head): their config fields
# (ModelConfig's defaults: the official DETR) and their weights' names
AID_FIELDS = ("query_groups", "dn_groups", "dn_box_noise", "dn_label_noise", "encoder_head")
AID_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in AID_FIELDS}
AID_WEIGHTS = ("group_queries", "denoising/", "encoder_head/")


class MLP(nnx.Module):
    """Linear layers with ReLU between them (the official box head: 3 layers, hidden_dim wide)."""

    def __init__(self, cin: int, hidden: int, cout: int, num_layers: int, dtype, *, rngs: nnx.Rngs):
        dims = [cin] + [hidden] * (num_layers - 1) + [cout]
        self.layers = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

    def __call__(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class DETR(nnx.Module):
    """The official DETR detector.

    Call with `pixels` [B, H, W, 3] float32 (normalised with the ImageNet mean and std) and `mask` [B, H, W]
    bool (True on real pixels, False on padding). Returns a dict:
      pred_logits [B, Q, C + 1]  class logits; the last class is no-object
      pred_boxes  [B, Q, 4]      normalised (cx, cy, w, h) in [0, 1], relative to each image's unpadded size
      aux_outputs                list over the first L - 1 decoder layers of dicts with the same two keys
      group_outputs              in training with `query_groups` G > 1 only: a list over the G - 1 extra query
                                 groups of dicts with the three keys above
      dn_outputs                 in training with `dn_groups` K > 0 and `denoise` given only: a list over the K
                                 denoising groups of such dicts, query i of each the noised target i
      enc_outputs                in training with `encoder_head` only: the encoder head's per-token pred_logits
                                 [B, h * w, C + 1] and pred_boxes [B, h * w, 4], with the tokens' centres
      pred_masks  [B, Q, H', W'] with `masks` only: mask logits at layer1's size (H' = ceil(H / 4)), from the
                                 last decoder layer (the official DETRsegm)
    Outputs are float32 whatever the compute dtype.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        c = config
        if not isinstance(c.num_classes, int):
            raise ValueError(f"model.num_classes is {c.num_classes!r}: a training run sets it from its data; to build "
                             "a model outside training, give the number of classes")
        dtype = jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32
        self.config = c
        self.dtype = dtype
        self.backbone = backbones.get(c.backbone).build(c, rngs)
        self.input_proj = nnx.Linear(self.backbone.out_channels, c.hidden_dim, dtype=dtype, rngs=rngs)  # 1x1 conv
        self.query_embed = nnx.Param(jax.random.normal(rngs.params(), (c.num_queries, c.hidden_dim)))
        if c.query_groups > 1:  # Group DETR's extra groups: weights of training only
            self.group_queries = nnx.Param(jax.random.normal(rngs.params(), (c.query_groups - 1, c.num_queries,
                                                                             c.hidden_dim)))
        self.deterministic = False  # set by nnx's train() / eval(): the extra query groups run in training only
        self.transformer = Transformer(c.hidden_dim, c.num_heads, c.enc_layers, c.dec_layers, c.ffn_dim,
                                       c.dropout, c.pre_norm, c.attention, dtype, c.norm_eps, rngs=rngs)
        self.class_embed = nnx.Linear(c.hidden_dim, c.num_classes + 1, dtype=dtype, rngs=rngs)
        self.bbox_embed = MLP(c.hidden_dim, c.hidden_dim, 4, 3, dtype, rngs=rngs)
        if c.masks:
            fpn_dims = [self.backbone.out_channels // 2**i for i in (1, 2, 3)]  # layer3, layer2, layer1
            self.bbox_attention = MHAttentionMap(c.hidden_dim, c.num_heads, dtype, rngs=rngs)
            self.mask_head = MaskHead(c.hidden_dim + c.num_heads, fpn_dims, c.hidden_dim, dtype,
                                      c.mask_attention_gain, rngs=rngs)
        if c.dn_groups > 0:  # DN-DETR's denoising queries' embeddings: weights of training only (drawn last: the
            self.denoising = Denoising(c.num_classes, c.hidden_dim, dtype, rngs=rngs)  # others as without them)
        if c.encoder_head:  # the encoder's dense supervision: weights of training only (drawn last, as above)
            self.encoder_head = EncoderHead(c.hidden_dim, c.num_classes, dtype, rngs=rngs)

    def __call__(self, pixels, mask=None, denoise=None):
        """`denoise`: (labels [K, B, M], boxes [K, B, M, 4]) noised targets (`denoising.noise_targets`), decoded
        in training when the model has `dn_groups`; ignored otherwise."""
        pixels = jnp.asarray(pixels, self.dtype)  # [B, H, W, 3]
        mask = jnp.ones(pixels.shape[:3], bool) if mask is None else jnp.asarray(mask, bool)  # [B, H, W]
        levels = self.backbone.pyramid(pixels, mask) if self.config.masks else [self.backbone(pixels, mask)]
        features = levels[-1]  # [B, h, w, C]
        b, h, w, _ = features.shape
        mask = resize_mask(mask, (h, w), self.config.mask_resize)  # [B, h, w]
        pos = sine_position_embedding(mask, self.config.hidden_dim // 2).astype(self.dtype)  # [B, h, w, D]
        src = self.input_proj(features)  # [B, h, w, D]
        d = src.shape[-1]
        queries = self.query_embed[...]  # [Q, D]
        groups = self.config.query_groups if not self.deterministic else 1
        if groups > 1:
            queries = jnp.concatenate([queries[None], self.group_queries[...]])  # [G, Q, D]
        extra = None
        if denoise is not None and self.config.dn_groups > 0 and not self.deterministic:
            extra = self.denoising(*denoise, self.config.num_queries)  # [K * B, Q, D] each
        hs, memory = self.transformer(src.reshape(b, h * w, d), mask.reshape(b, h * w), queries,
                                      pos.reshape(b, h * w, d), extra)  # [L, (G + K) * B, Q, D], [B, h * w, D]
        logits = self.class_embed(hs).astype(jnp.float32)  # [L, (G + K) * B, Q, C + 1]
        boxes = jax.nn.sigmoid(self.bbox_embed(hs).astype(jnp.float32))  # [L, (G + K) * B, Q, 4]
        out = [{"pred_logits": logits[-1, g * b:(g + 1) * b], "pred_boxes": boxes[-1, g * b:(g + 1) * b],
                "aux_outputs": [{"pred_logits": a[g * b:(g + 1) * b], "pred_boxes": bb[g * b:(g + 1) * b]}
                                for a, bb in zip(logits[:-1], boxes[:-1])]} for g in range(hs.shape[1] // b)]
        if groups > 1:
            out[0]["group_outputs"] = out[1:groups]
        if extra is not None:
            out[0]["dn_outputs"] = out[groups:]
        if self.config.encoder_head and not self.deterministic:
            out[0]["enc_outputs"] = self.encoder_head(memory.reshape(b, h, w, d), mask)
        if self.config.masks:
            attention = self.bbox_attention(hs[-1, :b], memory.reshape(b, h, w, d), mask)  # [B, Q, N, h, w]
            out[0]["pred_masks"] = self.mask_head(src, attention, levels[2::-1])  # [B, Q, H / 4, W / 4]
        return out[0]


def path_key(path) -> str:
    return "/".join(map(str, path))


def abstract(config: ModelConfig, seed: int = 0) -> DETR:
    """`DETR(config, rngs=nnx.Rngs(seed))` as shapes alone (`nnx.eval_shape`: no initialiser runs), a new model
    each call. The trace is kept per config (and backbone builder): a process that loads many weights files of one
    config traces the constructor once (it costs about what running it does)."""
    graphdef, state = _abstract(config, seed, backbones.get(config.backbone).build)
    return nnx.merge(graphdef, state, copy=True)  # new variables: no two models share one


@functools.lru_cache(maxsize=16)
def _abstract(config: ModelConfig, seed: int, build_backbone) -> tuple:
    return nnx.split(nnx.eval_shape(lambda: DETR(config, rngs=tracing_rngs(seed))))


def tracing_rngs(seed: int) -> nnx.Rngs:
    """`nnx.Rngs(seed)` for a model built under a trace (`nnx.eval_shape`): the same model, graphdef and state, but
    the streams' counters are references. A plain counter's `count[...] += 1` under a trace reads the tracer's
    `.sharding`, whose error message JAX builds by walking the whole trace, once per weight: quadratic (for
    DETR-R50 most of the tracing time; bench_startup.py)."""
    with nnx.var_defaults(ref=True):
        return nnx.Rngs(seed)


def assemble(config: ModelConfig, arrays: dict, *, seed: int = 0, init_rest: bool = False, sources=None) -> DETR:
    """A DETR in eval mode whose weights are `arrays` ({"backbone/conv1/kernel": array, ...}).

    Every weight must be given, unless `init_rest`, which initialises the others from `seed`. Without it nothing
    is initialised: the model is built abstractly and only its RNG streams get real keys. `sources` may name
    where each array came from, for the error messages.
    """
    model = DETR(config, rngs=nnx.Rngs(seed)) if init_rest else abstract(config, seed)
    graphdef, weights, rest = nnx.split(model, WEIGHTS, ...)  # type: ignore[misc]
    flat = dict(nnx.to_flat_state(weights))
    paths = {path_key(p): p for p in flat}
    extra = sorted(set(arrays) - set(paths))
    missing = [] if init_rest else sorted(set(paths) - set(arrays))
    if extra or missing:
        raise ValueError(f"weights do not fit the model: unexpected {extra[:8]}, missing {missing[:8]}")
    for name, value in arrays.items():
        want = tuple(flat[paths[name]].shape)
        if tuple(value.shape) != want:
            src = f" (from {sources[name]})" if sources and name in sources else ""
            raise ValueError(f"{name}{src} has shape {tuple(value.shape)}, the model needs {want}")
        flat[paths[name]] = flat[paths[name]].replace(jnp.asarray(value, jnp.float32))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat), rest)
    if not init_rest:
        nnx.reseed(model, default=seed)
    model.eval()
    return model


def weight_arrays(model: DETR) -> dict:
    """{"backbone/conv1/kernel": array, ...} for every weight of `model`."""
    return {path_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def plain(model: DETR) -> DETR:
    """The official DETR that an aided model serves (a new model, in eval mode): its config with the aids' fields
    at their defaults, its weights without theirs (inference never runs them). `model` itself when it has none."""
    if all(getattr(model.config, k) == v for k, v in AID_DEFAULTS.items()):
        return model
    arrays = {k: v for k, v in weight_arrays(model).items() if not k.startswith(AID_WEIGHTS)}
    return assemble(dataclasses.replace(model.config, **AID_DEFAULTS), arrays)
