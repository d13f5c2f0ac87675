"""One attention function with interchangeable kernels.

- `xla`: softmax(q k^T / sqrt(d)) v written out, with dropout on the attention weights (the official model's
  nn.MultiheadAttention(dropout=0.1)); it can also return the weights, for attention maps.
- `dot_product`: `jax.nn.dot_product_attention`, which picks cuDNN flash attention on a GPU where the dtype and
  shapes allow and XLA elsewhere. It has no attention dropout, so it refuses a training call that needs one.
- `auto`: `dot_product` on a GPU when no attention dropout is due, `xla` otherwise.
"""

import jax
import jax.numpy as jnp

from detrax.config import checks

KERNELS = ("xla", "dot_product", "auto")
checks.register("ModelConfig", lambda cfg: checks.choice("attention", cfg.attention, KERNELS))


def attention(q, k, v, key_mask=None, *, kernel: str = "xla", dropout_rate: float = 0.0, dropout_rng=None,
              dropout_keep=None, return_weights: bool = False):
    """q [B, T, N, D], k and v [B, S, N, D], key_mask [B, S] bool (True: attend) -> out [B, T, N, D].

    Dropout applies when `dropout_rate > 0` and either `dropout_rng` (a key) or `dropout_keep` (a bool mask
    [B, N, T, S] of the weights kept, drawn by the caller) is given. With `return_weights`, returns
    (out, weights [B, N, T, S]); only the xla kernel computes the weights.
    """
    needs_dropout = (dropout_rng is not None or dropout_keep is not None) and dropout_rate > 0.0
    if kernel == "auto":
        kernel = "dot_product" if (jax.default_backend() == "gpu" and not needs_dropout
                                   and not return_weights) else "xla"
    if kernel == "dot_product":
        if needs_dropout:
            raise ValueError("the dot_product attention kernel has no attention dropout: use attention='xla' "
                             "for training with dropout > 0, or attention='auto'")
        if return_weights:
            raise ValueError("attention weights need the xla kernel")
        mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, S]
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if kernel != "xla":
        raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("btnd,bsnd->bnts", q * scale, k)  # [B, N, T, S]
    if key_mask is not None:
        big_neg = jnp.finfo(logits.dtype).min
        logits = jnp.where(key_mask[:, None, None, :], logits, big_neg)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)  # [B, N, T, S]
    probs = weights
    if needs_dropout:
        keep = dropout_keep if dropout_keep is not None else jax.random.bernoulli(
            dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = apply_dropout(probs, keep, dropout_rate)
    out = jnp.einsum("bnts,bsnd->btnd", probs, v)  # [B, T, N, D]
    return (out, weights) if return_weights else out


def apply_dropout(x, keep, rate: float):
    """Dropout with a given keep-mask (None: none), scaled by 1 / (1 - rate) as nnx.Dropout."""
    return x if keep is None else jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
