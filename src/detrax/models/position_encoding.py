"""The sine position embedding of the official PositionEmbeddingSine(normalize=True), over the padding mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np


def resize_mask(mask, size, how: str = "torch"):
    """Nearest-neighbour resize of a [B, H, W] bool mask to `size`. `torch`: exactly as
    `F.interpolate(mask[None].float(), size).bool()`, source index floor(dst * (in / out)) in float32 (the
    official model); `half_pixel`: exactly as `jax.image.resize(mask, size, "nearest")`, source index
    floor((dst + 0.5) * (in / out)) (MasterSkepticista/detr)."""
    _, h, w = mask.shape
    half_pixel = how == "half_pixel"
    return resize_axis(resize_axis(mask, 1, h, size[0], half_pixel), 2, w, size[1], half_pixel)  # [B, h, w]


def resize_axis(mask, axis: int, n_in, n_out, half_pixel: bool = False):
    """Nearest-neighbour resize of one axis of any array (`torch` or `half_pixel` as above): static sizes take
    NumPy's indices, symbolic ones (an export with dynamic image sizes) the same float32 formula on the device."""
    if isinstance(n_in, int) and isinstance(n_out, int):
        return mask if n_in == n_out else jnp.take(mask, _nearest_index(n_in, n_out, half_pixel), axis=axis)
    size_in, size_out = (jnp.array(n).astype(jnp.float32) for n in (n_in, n_out))
    dst = jax.lax.iota(jnp.float32, n_out) + jnp.float32(0.5 if half_pixel else 0)
    idx = jnp.floor(dst * (size_in / size_out)).astype(jnp.int32)
    return jnp.take(mask, jnp.minimum(idx, jnp.array(n_in) - 1), axis=axis)


def _nearest_index(n_in: int, n_out: int, half_pixel: bool = False) -> np.ndarray:
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor((np.arange(n_out, dtype=np.float32) + np.float32(0.5 if half_pixel else 0)) * scale)
    idx = idx.astype(np.int64)
    return np.minimum(idx, n_in - 1)


def sine_position_embedding(mask, num_feats: int = 128, temperature: float = 10000.0,
                            scale: float = 2 * math.pi, eps: float = 1e-6):
    """mask [B, H, W] bool, True on real pixels -> [B, H, W, 2 * num_feats] float32 (y features, then x)."""
    m = mask.astype(jnp.float32)
    y = jnp.cumsum(m, axis=1)  # [B, H, W]
    x = jnp.cumsum(m, axis=2)  # [B, H, W]
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    f = np.arange(num_feats, dtype=np.float32)
    dim_t = temperature ** (2 * (f // 2) / num_feats)  # [F]
    pos_x = x[..., None] / dim_t  # [B, H, W, F]
    pos_y = y[..., None] / dim_t  # [B, H, W, F]
    b, h, w = mask.shape
    pos_x = jnp.stack([jnp.sin(pos_x[..., 0::2]), jnp.cos(pos_x[..., 1::2])], axis=-1).reshape(b, h, w, -1)
    pos_y = jnp.stack([jnp.sin(pos_y[..., 0::2]), jnp.cos(pos_y[..., 1::2])], axis=-1).reshape(b, h, w, -1)
    return jnp.concatenate([pos_y, pos_x], axis=-1)  # [B, H, W, 2F]
