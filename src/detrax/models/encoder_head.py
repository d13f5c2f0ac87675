"""Dense supervision of the encoder, training only (after Co-DETR's auxiliary one-to-many heads, Zong et al.
2023, in its simplest form): every encoder token inside a target box (or holding its centre) is trained to give
that box's class and the box itself, every other token no-object, and every token its own centre.

Why it pays for a DETR from scratch: the decoder reads the memory through cross-attention whose values carry no
position embedding, so its boxes can only come from what the memory's content says about where it is; the set
loss teaches that slowly, through the matched queries alone. Boxes in image coordinates and each token's own
centre, asked of the memory directly, make it class- and position-aware within the first few hundred steps
(benchmarks/history.md). The head is two Linear layers and an MLP on the memory (`encoder_head/` weights);
inference runs none of it."""

import jax
import jax.numpy as jnp
from flax import nnx


class EncoderHead(nnx.Module):
    """Class logits, a box and the token's own centre per encoder token."""

    def __init__(self, dim: int, num_classes: int, dtype, *, rngs: nnx.Rngs):
        self.class_embed = nnx.Linear(dim, num_classes + 1, dtype=dtype, rngs=rngs)
        self.box_hidden = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
        self.box_out = nnx.Linear(dim, 4, dtype=dtype, rngs=rngs)
        self.where = nnx.Linear(dim, 2, dtype=dtype, rngs=rngs)  # the token's own centre

    def __call__(self, memory, mask):
        """memory [B, h, w, D], mask [B, h, w] (True on the image) -> dict: pred_logits [B, h * w, C + 1],
        pred_boxes [B, h * w, 4] normalised (cx, cy, w, h) as the decoder's, pred_centres [B, h * w, 2] and
        centres [B, h * w, 2] (each token's centre, normalised to its image's unpadded part), token_valid
        [B, h * w], grid [B, 2] (the tokens across and down each image)."""
        b, h, w, _ = memory.shape
        cols = jnp.maximum(mask[:, 0, :].sum(-1), 1)[:, None].astype(jnp.float32)  # [B, 1] tokens on the image
        rows = jnp.maximum(mask[:, :, 0].sum(-1), 1)[:, None].astype(jnp.float32)
        cx = jnp.broadcast_to(((jnp.arange(w) + 0.5) / cols)[:, None, :], (b, h, w))  # [B, h, w]
        cy = jnp.broadcast_to(((jnp.arange(h) + 0.5) / rows)[:, :, None], (b, h, w))
        centres = jnp.stack([cx, cy], -1).reshape(b, h * w, 2)  # [B, hw, 2]
        logits = self.class_embed(memory).astype(jnp.float32).reshape(b, h * w, -1)  # [B, hw, C + 1]
        boxes = jax.nn.sigmoid(self.box_out(jax.nn.relu(self.box_hidden(memory))).astype(jnp.float32))  # [B, h, w, 4]
        boxes = boxes.reshape(b, h * w, 4)
        where = jax.nn.sigmoid(self.where(memory).astype(jnp.float32)).reshape(b, h * w, 2)  # [B, hw, 2]
        return {"pred_logits": logits, "pred_boxes": boxes, "pred_centres": where, "centres": centres,
                "token_valid": mask.reshape(b, h * w), "grid": jnp.concatenate([cols, rows], -1)}


def assign(centres, grid, labels, boxes, valid):
    """Each token's target: the smallest valid target box that holds the token's centre or whose own centre lies
    in the token's cell. centres [B, T, 2], grid [B, 2] (tokens across and down the image), labels [B, M], boxes
    [B, M, 4] (cx, cy, w, h), valid [B, M] -> (target index [B, T], positive [B, T])."""
    x, y = centres[..., 0, None], centres[..., 1, None]  # [B, T, 1]
    cx, cy, bw, bh = (boxes[:, None, :, i] for i in range(4))  # [B, 1, M]
    inside = (jnp.abs(x - cx) < bw / 2) & (jnp.abs(y - cy) < bh / 2)  # [B, T, M]
    cols, rows = grid[:, 0, None, None], grid[:, 1, None, None]  # [B, 1, 1]
    own_cell = (jnp.floor(x * cols) == jnp.floor(cx * cols)) & (jnp.floor(y * rows) == jnp.floor(cy * rows))
    hold = (inside | own_cell) & valid[:, None, :]  # [B, T, M]
    area = jnp.where(hold, bw * bh, jnp.inf)  # [B, T, M]
    return area.argmin(-1), hold.any(-1)  # [B, T], [B, T]
