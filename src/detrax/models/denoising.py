"""DN-DETR's denoising queries (Li et al. 2022) for DETR's learned queries, training only: each target's box and
label, noised, become an extra decoder query (its label's embedding as the content, an MLP of its box's sine
embedding as the position) that must give back the target itself, with no matching. The model decodes each
denoising group as a block of its own beside the query groups (`transformer.Transformer`), so the matched
queries never see them and the groups never see each other; inference runs none of it."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def noise_targets(key, labels, boxes, valid, groups: int, num_classes: int, box_noise: float = 0.4,
                  label_noise: float = 0.2):
    """labels [B, M] int, boxes [B, M, 4] normalised (cx, cy, w, h), valid [B, M] -> (labels [K, B, M], boxes
    [K, B, M, 4]) for K = `groups`: each label replaced by a uniformly drawn class with probability
    `label_noise`; each box's centre moved by up to `box_noise` times its half size and its width and height
    scaled by a factor in [1 - box_noise, 1 + box_noise] (DN-DETR's lambda1 and lambda2), clipped to [0, 1].
    Empty slots get the no-object label `num_classes`."""
    k_flip, k_label, k_box = jax.random.split(key, 3)
    shape = (groups,) + labels.shape  # [K, B, M]
    flip = jax.random.uniform(k_flip, shape) < label_noise
    noised_labels = jnp.where(flip, jax.random.randint(k_label, shape, 0, num_classes), labels[None])
    noised_labels = jnp.where(valid[None], noised_labels, num_classes)  # [K, B, M]
    u = jax.random.uniform(k_box, shape + (4,), minval=-1.0, maxval=1.0)  # [K, B, M, 4]
    wh = boxes[None, ..., 2:]  # [1, B, M, 2]
    centre = boxes[None, ..., :2] + u[..., :2] * wh / 2 * box_noise
    size = wh * (1 + u[..., 2:] * box_noise)
    noised_boxes = jnp.clip(jnp.concatenate([centre, size], -1), 0.0, 1.0)  # [K, B, M, 4]
    return noised_labels, jnp.where(valid[None, ..., None], noised_boxes, 0.5)


def box_sine(boxes, dim: int):
    """boxes [..., 4] in [0, 1] -> [..., dim]: each coordinate's sines and cosines at dim / 4 frequencies (the
    sine position embedding's, over 2 pi)."""
    n = dim // 4
    freq = 10000.0 ** (2 * (np.arange(n) // 2) / n)  # [n]
    x = boxes[..., None] * (2 * np.pi) / freq  # [..., 4, n]
    x = jnp.where(np.arange(n) % 2 == 0, jnp.sin(x), jnp.cos(x))
    return x.reshape(boxes.shape[:-1] + (4 * n,))


class Denoising(nnx.Module):
    """The denoising queries' embeddings (training-only weights): a label embedding (no-object included) and a
    two-layer MLP of the box's sine embedding."""

    def __init__(self, num_classes: int, dim: int, dtype, *, rngs: nnx.Rngs):
        self.label_embed = nnx.Param(jax.random.normal(rngs.params(), (num_classes + 1, dim)))
        self.box_in = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.box_out = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, labels, boxes, num_queries: int):
        """labels [K, B, M], boxes [K, B, M, 4] (M <= num_queries) -> (content, position) [K * B, Q, D], the slots
        past M filled with no-object queries at the image's centre."""
        k, b, m = labels.shape
        labels = jnp.pad(labels, ((0, 0), (0, 0), (0, num_queries - m)), constant_values=self.label_embed.shape[0] - 1)
        boxes = jnp.pad(boxes, ((0, 0), (0, 0), (0, num_queries - m), (0, 0)), constant_values=0.5)
        content = self.label_embed[...][labels]  # [K, B, Q, D]
        position = self.box_out(jax.nn.relu(self.box_in(box_sine(boxes, content.shape[-1]).astype(content.dtype))))
        return content.reshape((k * b,) + content.shape[2:]), position.reshape((k * b,) + position.shape[2:])
