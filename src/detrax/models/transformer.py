"""The DETR encoder-decoder transformer (official models/transformer.py), sequences as [B, S, D].

Post-norm by default, pre-norm as an option. Positions are added to queries and keys, never to values. The
decoder starts from zeros, and its final LayerNorm is applied to the output of every layer (the auxiliary
outputs), as the official `return_intermediate=True`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detrax.models.attention import apply_dropout, attention

_xavier = jax.nn.initializers.xavier_uniform()


def _linear(cin, cout, dtype, rngs):
    return nnx.Linear(cin, cout, dtype=dtype, kernel_init=_xavier, rngs=rngs)


def _norm(d, dtype, eps, rngs):
    return nnx.LayerNorm(d, epsilon=eps, dtype=dtype, rngs=rngs)


def _dropout_masks(drop: nnx.Dropout, shapes: dict) -> dict:
    """The keep-masks of one layer call's dropout sites ({site: shape}, named as the official layer's dropout
    modules, `self_attn` and `cross_attn` for the attention weights), or Nones in eval mode. One draw from the
    layer's stream and one random-bits generator for all its sites: XLA compiles a generator per draw (the
    compile-time figures: benchmarks/history.md)."""
    if drop.deterministic or drop.rate == 0.0:
        return dict.fromkeys(shapes)
    sizes = [math.prod(s) for s in shapes.values()]
    bits = jax.random.bits(drop.rngs(), (sum(sizes),), jnp.uint32)  # [sum of sizes]
    keep = bits < jnp.uint32(round((1.0 - drop.rate) * 2**32))  # P(keep) = 1 - rate, to 2^-32
    offsets = np.cumsum([0] + sizes)
    return {site: keep[a:b].reshape(s) for a, b, (site, s) in zip(offsets[:-1], offsets[1:], shapes.items())}


class MultiHeadAttention(nnx.Module):
    """nn.MultiheadAttention with separate q/k/v projections and dropout on the attention weights."""

    def __init__(self, d: int, num_heads: int, dropout: float, kernel: str, dtype, *, rngs: nnx.Rngs):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (_linear(d, d, dtype, rngs) for _ in range(4))
        self.attn_dropout = nnx.Dropout(dropout, rngs=rngs)  # holds the rate, the rng stream, train/eval
        self.num_heads, self.kernel = num_heads, kernel
        self.record_weights = False  # when on, sows the weights [B, N, T, S] as nnx.Intermediate 'weights'

    def __call__(self, q, k, v, key_mask=None, dropout_keep=None):
        """q [B, T, D], k and v [B, S, D], key_mask [B, S]; `dropout_keep` [B, N, T, S] as drawn by the layer (else
        this module draws its own, in training)."""
        b, t, d = q.shape
        heads = lambda x: x.reshape(x.shape[0], x.shape[1], self.num_heads, d // self.num_heads)
        q, k, v = heads(self.q_proj(q)), heads(self.k_proj(k)), heads(self.v_proj(v))  # [B, *, N, D/N]
        drop = self.attn_dropout
        if drop.deterministic or drop.rate == 0.0:
            dropout_keep = None
        elif dropout_keep is None:
            dropout_keep = _dropout_masks(drop, {"attn": (b, self.num_heads, t, k.shape[1])})["attn"]  # [B, N, T, S]
        out = attention(q, k, v, key_mask, kernel=self.kernel, dropout_rate=drop.rate, dropout_keep=dropout_keep,
                        return_weights=self.record_weights)
        if self.record_weights:
            out, weights = out
            self.sow(nnx.Intermediate, "weights", weights)
        return self.out_proj(out.reshape(b, t, d))  # [B, T, D]


class EncoderLayer(nnx.Module):
    def __init__(self, d, num_heads, ffn, dropout, pre_norm, kernel, dtype, eps, *, rngs: nnx.Rngs):
        self.self_attn = MultiHeadAttention(d, num_heads, dropout, kernel, dtype, rngs=rngs)
        self.linear1, self.linear2 = _linear(d, ffn, dtype, rngs), _linear(ffn, d, dtype, rngs)
        self.norm1, self.norm2 = _norm(d, dtype, eps, rngs), _norm(d, dtype, eps, rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.pre_norm = pre_norm

    def __call__(self, src, key_mask, pos):  # src, pos [B, S, D]; key_mask [B, S]
        b, s, d = src.shape
        n, f = self.self_attn.num_heads, self.linear1.out_features
        m = _dropout_masks(self.dropout, {"dropout": (b, s, f), "self_attn": (b, n, s, s), "dropout1": (b, s, d),
                                          "dropout2": (b, s, d)})
        drop = lambda x, site: apply_dropout(x, m[site], self.dropout.rate)
        ffn = lambda x: self.linear2(drop(jax.nn.relu(self.linear1(x)), "dropout"))
        if self.pre_norm:
            x = self.norm1(src)
            src = src + drop(self.self_attn(x + pos, x + pos, x, key_mask, m["self_attn"]), "dropout1")
            return src + drop(ffn(self.norm2(src)), "dropout2")
        src = self.norm1(src + drop(self.self_attn(src + pos, src + pos, src, key_mask, m["self_attn"]), "dropout1"))
        return self.norm2(src + drop(ffn(src), "dropout2"))


class DecoderLayer(nnx.Module):
    def __init__(self, d, num_heads, ffn, dropout, pre_norm, kernel, dtype, eps, *, rngs: nnx.Rngs):
        self.self_attn = MultiHeadAttention(d, num_heads, dropout, kernel, dtype, rngs=rngs)
        self.cross_attn = MultiHeadAttention(d, num_heads, dropout, kernel, dtype, rngs=rngs)
        self.linear1, self.linear2 = _linear(d, ffn, dtype, rngs), _linear(ffn, d, dtype, rngs)
        self.norm1, self.norm2, self.norm3 = (_norm(d, dtype, eps, rngs) for _ in range(3))
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.pre_norm = pre_norm

    def __call__(self, tgt, memory, key_mask, pos, query_pos):  # tgt [B, Q, D]; memory, pos [B, S, D]
        (b, q, d), s = tgt.shape, memory.shape[1]
        n, f = self.self_attn.num_heads, self.linear1.out_features
        m = _dropout_masks(self.dropout, {"dropout": (b, q, f), "self_attn": (b, n, q, q), "dropout1": (b, q, d),
                                          "cross_attn": (b, n, q, s), "dropout2": (b, q, d), "dropout3": (b, q, d)})
        drop = lambda x, site: apply_dropout(x, m[site], self.dropout.rate)
        ffn = lambda x: self.linear2(drop(jax.nn.relu(self.linear1(x)), "dropout"))
        self_attn = lambda x, v: self.self_attn(x, x, v, None, m["self_attn"])  # x: with the query positions
        cross_attn = lambda x: self.cross_attn(x + query_pos, memory + pos, memory, key_mask, m["cross_attn"])
        if self.pre_norm:
            x = self.norm1(tgt)
            tgt = tgt + drop(self_attn(x + query_pos, x), "dropout1")
            tgt = tgt + drop(cross_attn(self.norm2(tgt)), "dropout2")
            return tgt + drop(ffn(self.norm3(tgt)), "dropout3")
        tgt = self.norm1(tgt + drop(self_attn(tgt + query_pos, tgt), "dropout1"))
        tgt = self.norm2(tgt + drop(cross_attn(tgt), "dropout2"))
        return self.norm3(tgt + drop(ffn(tgt), "dropout3"))


class Transformer(nnx.Module):
    """The encoder and decoder stacks; the sizes are a `ModelConfig`'s (hidden_dim, num_heads, ...)."""

    def __init__(self, d, num_heads, enc_layers, dec_layers, ffn, dropout, pre_norm, kernel, dtype, eps, *,
                 rngs: nnx.Rngs):
        args = (d, num_heads, ffn, dropout, pre_norm, kernel, dtype, eps)
        self.encoder = nnx.List([EncoderLayer(*args, rngs=rngs) for _ in range(enc_layers)])
        self.decoder = nnx.List([DecoderLayer(*args, rngs=rngs) for _ in range(dec_layers)])
        self.encoder_norm = _norm(d, dtype, eps, rngs) if pre_norm else None  # the official: with pre-norm only
        self.decoder_norm = _norm(d, dtype, eps, rngs)

    def __call__(self, src, key_mask, query_embed, pos, extra=None):
        """src, pos [B, S, D]; key_mask [B, S] (True: real); query_embed [Q, D] -> hs [L, B, Q, D], memory.
        With query groups, query_embed [G, Q, D] -> hs [L, G * B, Q, D] (group-major): each group decodes the same
        memory on its own, so self-attention stays within a group (Group DETR). `extra`: (content, position)
        [K * B, Q, D] of K more blocks of per-image queries (denoising), decoded after the groups in the same way:
        hs [L, (G + K) * B, Q, D]."""
        memory = src
        for layer in self.encoder:
            memory = layer(memory, key_mask, pos)
        if self.encoder_norm is not None:
            memory = self.encoder_norm(memory)
        b, queries = src.shape[0], query_embed.reshape((-1,) + query_embed.shape[-2:])  # [G, Q, D]
        query_pos = jnp.repeat(queries.astype(src.dtype), b, axis=0)  # [G * B, Q, D]
        tgt = jnp.zeros_like(query_pos)  # [G * B, Q, D]
        if extra is not None:
            tgt = jnp.concatenate([tgt, extra[0].astype(src.dtype)])  # [(G + K) * B, Q, D]
            query_pos = jnp.concatenate([query_pos, extra[1].astype(src.dtype)])
        g = query_pos.shape[0] // b
        dec_memory, dec_mask, dec_pos = (jnp.tile(x, (g,) + (1,) * (x.ndim - 1)) if g > 1 else x
                                         for x in (memory, key_mask, pos))  # [(G + K) * B, S, ...]
        hs = []
        for layer in self.decoder:
            tgt = layer(tgt, dec_memory, dec_mask, dec_pos, query_pos)
            hs.append(self.decoder_norm(tgt))
        return jnp.stack(hs), memory  # [L, G * B, Q, D], [B, S, D]
