"""An independent Flax linen rendering of MasterSkepticista/detr's detector (models/detr.py, models/resnet.py,
model_lib/layers/attention_layers.py), written from its code: the same modules in the same order, so linen
names its parameters as that project's checkpoints do. Its quirks are kept: LayerNorm epsilon 1e-6 (linen's),
the padding mask brought to the features with jax.image.resize's nearest, masked logits set to float32's
minimum, zero object queries, and one class and one box head applied to every decoder layer. The backbone
computes in `backbone_dtype` (that project: bfloat16; float32 here unless asked).

`checkpoint_bytes` writes a model's variables as its trainer does (flax.training.checkpoints with Orbax off:
msgpack of the TrainState fields)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization


class Downsample(nn.Module):
    num_filters: int
    strides: tuple
    conv: Any
    norm: Any

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.num_filters, (1, 1), strides=self.strides, name="0")(x)
        return self.norm(name="1")(x)


class ResidualBlock(nn.Module):
    filters: int
    strides: tuple = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        nout = self.filters * 4
        norm = functools.partial(nn.BatchNorm, use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        residual = x
        if x.shape[-1] != nout or self.strides != (1, 1):
            residual = Downsample(nout, self.strides, conv, norm, name="downsample")(residual)
        x = nn.relu(norm(name="bn1")(conv(self.filters, (1, 1), name="conv1")(x)))
        y = conv(self.filters, (3, 3), self.strides, padding=[(1, 1), (1, 1)], name="conv2")(x)
        y = nn.relu(norm(name="bn2")(y))
        y = norm(name="bn3")(conv(nout, (1, 1), name="conv3")(y))
        return nn.relu(residual + y)


class Stage(nn.Module):
    num_units: int
    filters: int
    first_stride: tuple = (1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ResidualBlock(self.filters, self.first_stride, self.dtype, name="0")(x)
        for i in range(1, self.num_units):
            x = ResidualBlock(self.filters, dtype=self.dtype, name=str(i))(x)
        return x


class Backbone(nn.Module):
    blocks: tuple = (3, 4, 6, 3)
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, dtype=self.dtype,
                    name="conv1")(x)
        x = nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn1")(x)
        x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding=[(1, 1), (1, 1)])
        for i, n in enumerate(self.blocks):
            x = Stage(n, self.width * 2**i, (1, 1) if i == 0 else (2, 2), self.dtype, name=f"layer{i + 1}")(x)
        return x


def pos_embedding_sine(padding_mask, hidden_dim, temperature=10_000):
    """InputPosEmbeddingSine: padding_mask [B, h, w], 1 on the image -> [B, h*w, D]."""
    mask = padding_mask.astype(jnp.float32)
    y_embed, x_embed = jnp.cumsum(mask, axis=1), jnp.cumsum(mask, axis=2)
    eps, scale = 1e-6, 2 * jnp.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    n = hidden_dim // 2
    dim_t = temperature ** (2 * (jnp.arange(n, dtype=jnp.float32) // 2) / n)
    pos_x, pos_y = x_embed[..., None] / dim_t, y_embed[..., None] / dim_t
    pos_x = jnp.stack([jnp.sin(pos_x[..., 0::2]), jnp.cos(pos_x[..., 1::2])], axis=4).reshape(mask.shape + (-1,))
    pos_y = jnp.stack([jnp.sin(pos_y[..., 0::2]), jnp.cos(pos_y[..., 1::2])], axis=4).reshape(mask.shape + (-1,))
    b, h, w = mask.shape
    return jnp.concatenate([pos_y, pos_x], axis=3).reshape(b, h * w, hidden_dim)


class QueryPosEmbedding(nn.Module):
    hidden_dim: int
    num_queries: int

    @nn.compact
    def __call__(self):
        return self.param("query_emb", nn.initializers.normal(1.0), (self.num_queries, self.hidden_dim))[None]


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.relu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class MultiHeadDotProductAttention(nn.Module):
    num_heads: int

    @nn.compact
    def __call__(self, inputs_q, inputs_kv=None, *, pos_emb_q=None, pos_emb_k=None, key_padding_mask=None):
        inputs_kv = inputs_q if inputs_kv is None else inputs_kv
        features = inputs_q.shape[-1]
        head_dim = features // self.num_heads
        query = inputs_q if pos_emb_q is None else inputs_q + pos_emb_q
        key = inputs_kv if pos_emb_k is None else inputs_kv + pos_emb_k
        dense = functools.partial(nn.DenseGeneral, axis=-1, features=(self.num_heads, head_dim))
        query, key, value = dense(name="query")(query), dense(name="key")(key), dense(name="value")(inputs_kv)
        query = query / jnp.sqrt(head_dim).astype(jnp.float32)
        logits = jnp.einsum("...qhd,...khd->...hqk", query, key)  # [B, H, q, k]
        if key_padding_mask is not None:
            logits = jnp.where(key_padding_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits.astype(jnp.float32))
        x = jnp.einsum("...hqk,...khd->...qhd", weights, value)
        return nn.DenseGeneral(features=features, axis=(-2, -1), name="out")(x)


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    pre_norm: bool

    @nn.compact
    def __call__(self, inputs, *, pos_embedding, padding_mask):
        attn = MultiHeadDotProductAttention(self.num_heads)
        mlp = MlpBlock(self.mlp_dim)
        if self.pre_norm:
            x = nn.LayerNorm()(inputs)
            x = attn(x, pos_emb_q=pos_embedding, pos_emb_k=pos_embedding, key_padding_mask=padding_mask) + inputs
            return x + mlp(nn.LayerNorm()(x))
        x = attn(inputs, pos_emb_q=pos_embedding, pos_emb_k=pos_embedding, key_padding_mask=padding_mask)
        x = nn.LayerNorm()(x + inputs)
        return nn.LayerNorm()(x + mlp(x))


class DecoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    pre_norm: bool

    @nn.compact
    def __call__(self, obj_queries, encoder_output, *, pos_embedding, query_pos_emb, key_padding_mask):
        self_attn = MultiHeadDotProductAttention(self.num_heads)
        cross_attn = MultiHeadDotProductAttention(self.num_heads)
        mlp = MlpBlock(self.mlp_dim)
        cross = functools.partial(cross_attn, inputs_kv=encoder_output, pos_emb_q=query_pos_emb,
                                  pos_emb_k=pos_embedding, key_padding_mask=key_padding_mask)
        if self.pre_norm:
            x = nn.LayerNorm()(obj_queries)
            x = self_attn(x, pos_emb_q=query_pos_emb, pos_emb_k=query_pos_emb) + obj_queries
            y = cross(nn.LayerNorm()(x)) + x
            return mlp(nn.LayerNorm()(y)) + y
        x = self_attn(obj_queries, pos_emb_q=query_pos_emb, pos_emb_k=query_pos_emb)
        x = nn.LayerNorm()(x + obj_queries)
        y = nn.LayerNorm()(cross(x) + x)
        return nn.LayerNorm()(y + mlp(y))


class Encoder(nn.Module):
    num_heads: int
    num_layers: int
    mlp_dim: int
    pre_norm: bool
    norm: Any = None

    @nn.compact
    def __call__(self, x, *, pos_embedding, padding_mask):
        for i in range(self.num_layers):
            x = EncoderBlock(self.num_heads, self.mlp_dim, self.pre_norm, name=f"encoderblock_{i}")(
                x, pos_embedding=pos_embedding, padding_mask=padding_mask)
        return x if self.norm is None else self.norm(x)


class Decoder(nn.Module):
    num_heads: int
    num_layers: int
    mlp_dim: int
    pre_norm: bool
    norm: Any = None

    @nn.compact
    def __call__(self, y, memory, *, key_padding_mask, pos_embedding, query_pos_emb):
        outputs = []
        for i in range(self.num_layers):
            y = DecoderBlock(self.num_heads, self.mlp_dim, self.pre_norm, name=f"decoderblock_{i}")(
                y, memory, pos_embedding=pos_embedding, query_pos_emb=query_pos_emb, key_padding_mask=key_padding_mask)
            outputs.append(y)
        return self.norm(jnp.stack(outputs, axis=0))  # [L, B, Q, D]: return_intermediate (aux_loss)


class DETRTransformer(nn.Module):
    num_queries: int
    num_heads: int
    enc_layers: int
    dec_layers: int
    mlp_dim: int
    pre_norm: bool

    @nn.compact
    def __call__(self, inputs, *, padding_mask, pos_embedding, query_pos_emb):
        encoder_norm = nn.LayerNorm() if self.pre_norm else None
        memory = Encoder(self.num_heads, self.enc_layers, self.mlp_dim, self.pre_norm, encoder_norm, name="encoder")(
            inputs, padding_mask=padding_mask, pos_embedding=pos_embedding)
        obj_queries = jnp.zeros((inputs.shape[0], self.num_queries, inputs.shape[-1]))
        decoder_norm = nn.LayerNorm()
        return Decoder(self.num_heads, self.dec_layers, self.mlp_dim, self.pre_norm, decoder_norm, name="decoder")(
            obj_queries, memory, key_padding_mask=padding_mask, pos_embedding=pos_embedding,
            query_pos_emb=query_pos_emb)


class BBoxCoordPredictor(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = nn.relu(nn.Dense(self.mlp_dim)(x))
        return nn.sigmoid(nn.Dense(4)(x))


class ObjectClassPredictor(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(x)


class DETR(nn.Module):
    """pred_logits [L, B, Q, C] (class 0 background), pred_boxes [L, B, Q, 4] over every decoder layer."""

    num_classes: int = 81
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    mlp_dim: int = 2048
    pre_norm: bool = False
    blocks: tuple = (3, 4, 6, 3)
    width: int = 64
    backbone_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs, padding_mask):
        x = Backbone(self.blocks, self.width, self.backbone_dtype, name="backbone")(inputs)
        b, h, w, _ = x.shape
        mask = jax.image.resize(padding_mask.astype(jnp.float32), shape=[b, h, w], method="nearest").astype(bool)
        pos = pos_embedding_sine(mask, self.hidden_dim)
        query_pos = QueryPosEmbedding(self.hidden_dim, self.num_queries)()
        x = nn.Conv(self.hidden_dim, (1, 1), (1, 1))(x).reshape(b, h * w, self.hidden_dim)
        hs = DETRTransformer(self.num_queries, self.num_heads, self.enc_layers, self.dec_layers, self.mlp_dim,
                             self.pre_norm, name="transformer")(
            x, padding_mask=mask.reshape(b, h * w), pos_embedding=pos, query_pos_emb=query_pos)
        logits = ObjectClassPredictor(self.num_classes)(hs)  # one head for all layers (that project's vmap)
        boxes = BBoxCoordPredictor(self.hidden_dim)(hs)
        return logits, boxes


def initial(module, *args, seed: int = 0) -> dict:
    """`module.init(key, *args)`'s variables in its initialisers' scales, drawn with NumPy on the shapes of
    `jax.eval_shape` (no init program to compile: 5 s of XLA each): kernels normal with variance 1 / fan-in
    (lecun's; a DenseGeneral's fan-in is the axes it contracts), the object queries N(0, 1), biases zeros,
    LayerNorm scales ones, batch statistics zeros and ones. `randomise` then moves them all."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names, shape = [getattr(k, "key", "") for k in path], leaf.shape
        if names[-1] == "kernel":
            fan_in = np.prod(shape[:-1]) if len(shape) != 3 or "out" in names else shape[0]
            return rng.normal(0, 1 / np.sqrt(fan_in), shape).astype(np.float32)
        if names[-1] == "query_emb":
            return rng.normal(0, 1, shape).astype(np.float32)
        return (np.ones if names[-1] in ("scale", "var") else np.zeros)(shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(module.init, jax.random.key(0), *args))


def randomise(variables, seed: int = 0):
    """Every parameter moved off its initial value (biases and norms are zeros and ones at init) and batch
    statistics made non-trivial (means around 0, variances in [0.5, 2])."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.05, p.shape).astype(np.float32),
                          variables["params"])
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: (rng.uniform(0.5, 2.0, v.shape) if path[-1].key == "var" else rng.normal(0, 0.2, v.shape))
        .astype(np.float32), variables["batch_stats"])
    return {"params": params, "batch_stats": stats}


def checkpoint_bytes(variables, step: int = 1000) -> bytes:
    """What `flax.training.checkpoints.save_checkpoint(workdir, train_state, step)` writes for that project's
    TrainState (Orbax off): msgpack of its fields."""
    state = {"opt_state": {"0": {"count": np.asarray(step)}}, "params": variables["params"], "global_step": step,
             "model_state": {"batch_stats": variables["batch_stats"]}, "rng": np.zeros(2, np.uint32),
             "metadata": None}
    return serialization.msgpack_serialize(jax.tree.map(np.asarray, state))
