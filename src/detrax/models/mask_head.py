"""The official DETR's mask head (DETRsegm): an attention map of each query over the encoder memory, turned into
a mask at a quarter of the input's resolution by a small FPN-style convolutional head fed with the backbone's
layer3, layer2 and layer1 features. Names follow the official module (`bbox_attention`, `mask_head.lay1`...)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from detrax.models.position_encoding import resize_axis

_kaiming_uniform_a1 = jax.nn.initializers.variance_scaling(1.0, "fan_in", "uniform")  # torch kaiming_uniform_(a=1)


def resize_nearest(x, size):
    """x [N, h, w, C] -> [N, H, W, C] as torch's F.interpolate(mode="nearest", size=size) (symbolic sizes too)."""
    x = resize_axis(x, 1, x.shape[1], size[0])
    return resize_axis(x, 2, x.shape[2], size[1])


class MHAttentionMap(nnx.Module):
    """Multi-head attention weights only (no values): softmax over every head and pixel together."""

    def __init__(self, dim: int, num_heads: int, dtype, *, rngs: nnx.Rngs):
        init = dict(kernel_init=jax.nn.initializers.xavier_uniform(), dtype=dtype, rngs=rngs)
        self.q_linear = nnx.Linear(dim, dim, **init)
        self.k_linear = nnx.Linear(dim, dim, **init)
        self.num_heads = num_heads

    def __call__(self, q, memory, mask):
        """q [B, Q, D]; memory [B, h, w, D]; mask [B, h, w] (True: real) -> weights [B, Q, N, h, w]."""
        b, nq, d = q.shape
        n = self.num_heads
        qh = self.q_linear(q).reshape(b, nq, n, d // n) * (d / n) ** -0.5  # [B, Q, N, d]
        kh = self.k_linear(memory).reshape(memory.shape[:3] + (n, d // n))  # [B, h, w, N, d]
        weights = jnp.einsum("bqnc,bhwnc->bqnhw", qh, kh).astype(jnp.float32)  # [B, Q, N, h, w]
        weights = jnp.where(mask[:, None, None], weights, -jnp.inf)
        shape = weights.shape
        return jax.nn.softmax(weights.reshape(b, nq, -1), axis=-1).reshape(shape)  # over heads and pixels


class MaskHead(nnx.Module):
    """MaskHeadSmallConv: 3x3 convolutions with GroupNorm and ReLU, from D + N channels at the feature map's
    stride down to hidden_dim / 16 at layer1's (stride 4), adding each FPN level's 1x1-adapted backbone features
    after a nearest upsampling; one mask logit per query and pixel. `attention_gain` scales lay1's kernel on the
    attention channels at initialisation (ModelConfig.mask_attention_gain)."""

    def __init__(self, dim: int, fpn_dims, context_dim: int, dtype, attention_gain: float = 1.0, *, rngs: nnx.Rngs):
        inter = [dim, context_dim // 2, context_dim // 4, context_dim // 8, context_dim // 16]
        conv = lambda a, b: nnx.Conv(a, b, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_kaiming_uniform_a1,
                                     dtype=dtype, rngs=rngs)
        norm = lambda c: nnx.GroupNorm(c, num_groups=min(8, c), epsilon=1e-5, use_fast_variance=False,
                                       dtype=dtype, rngs=rngs)
        self.lay1, self.gn1 = conv(dim, dim), norm(dim)
        if attention_gain != 1:  # ModelConfig.mask_attention_gain: the kernel on the attention channels
            self.lay1.kernel.set_value(self.lay1.kernel.get_value().at[:, :, context_dim:].multiply(attention_gain))
        self.lay2, self.gn2 = conv(dim, inter[1]), norm(inter[1])
        self.lay3, self.gn3 = conv(inter[1], inter[2]), norm(inter[2])
        self.lay4, self.gn4 = conv(inter[2], inter[3]), norm(inter[3])
        self.lay5, self.gn5 = conv(inter[3], inter[4]), norm(inter[4])
        self.out_lay = conv(inter[4], 1)
        adapter = lambda a, b: nnx.Linear(a, b, kernel_init=_kaiming_uniform_a1, dtype=dtype, rngs=rngs)  # 1x1
        self.adapter1 = adapter(fpn_dims[0], inter[1])
        self.adapter2 = adapter(fpn_dims[1], inter[2])
        self.adapter3 = adapter(fpn_dims[2], inter[3])

    def __call__(self, src, attention, fpns):
        """src [B, h, w, D] (the projected features); attention [B, Q, N, h, w]; fpns: layer3, layer2, layer1
        outputs [B, hi, wi, Ci] -> mask logits [B, Q, h1, w1] (layer1's size)."""
        b, nq, n, h, w = attention.shape
        x = jnp.concatenate([jnp.broadcast_to(src[:, None], (b, nq) + src.shape[1:]),
                             attention.transpose(0, 1, 3, 4, 2).astype(src.dtype)], -1)  # [B, Q, h, w, D + N]
        x = x.reshape((b * nq,) + x.shape[2:])  # [B * Q, h, w, D + N]
        x = jax.nn.relu(self.gn1(self.lay1(x)))
        x = jax.nn.relu(self.gn2(self.lay2(x)))
        for adapter, lay, gn, fpn in ((self.adapter1, self.lay3, self.gn3, fpns[0]),
                                      (self.adapter2, self.lay4, self.gn4, fpns[1]),
                                      (self.adapter3, self.lay5, self.gn5, fpns[2])):
            f = adapter(fpn)  # [B, hi, wi, c]
            x = resize_nearest(x, f.shape[1:3])  # [B * Q, hi, wi, c]
            x = (x.reshape((b, nq) + x.shape[1:]) + f[:, None]).reshape(x.shape)
            x = jax.nn.relu(gn(lay(x)))
        x = self.out_lay(x)  # [B * Q, h1, w1, 1]
        return x.reshape((b, nq) + x.shape[1:3]).astype(jnp.float32)  # [B, Q, h1, w1]


def weights_table(names) -> dict:
    """The mask head's key table from the official DETRsegm names (also HF's hub files: `bbox_attention.q_linear`,
    `mask_head.lay1`, `mask_head.adapter1`...) or transformers 5's (`q_proj`, `conv1.conv`, `fpn_stages.0`...)."""
    from detrax.models import keys

    v5 = "mask_head.conv1.conv.weight" in set(names)
    t: dict = {}
    for a in ("q", "k"):
        keys.dense(t, f"bbox_attention/{a}_linear", f"bbox_attention.{a}_{'proj' if v5 else 'linear'}")
    convs = {f"lay{i}": f"conv{i}.conv" for i in (1, 2)} | {f"lay{i + 3}": f"fpn_stages.{i}.refine.conv"
                                                            for i in range(3)}
    norms = {f"gn{i}": f"conv{i}.norm" for i in (1, 2)} | {f"gn{i + 3}": f"fpn_stages.{i}.refine.norm"
                                                          for i in range(3)}
    for dst, src in convs.items() | {"out_lay": "output_conv"}.items():
        t[f"mask_head/{dst}/kernel"] = (f"mask_head.{src if v5 else dst}.weight", keys.conv)
        t[f"mask_head/{dst}/bias"] = (f"mask_head.{src if v5 else dst}.bias", keys.same)
    for dst, src in norms.items():
        keys.norm(t, f"mask_head/{dst}", f"mask_head.{src if v5 else dst}")
    for i in range(3):
        src = f"mask_head.{f'fpn_stages.{i}.fpn_adapter' if v5 else f'adapter{i + 1}'}"
        t[f"mask_head/adapter{i + 1}/kernel"] = (f"{src}.weight", keys.conv1x1)
        t[f"mask_head/adapter{i + 1}/bias"] = (f"{src}.bias", keys.same)
    return t


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in]: one axis of torch's F.interpolate(mode="bilinear", align_corners=False) as a matrix. Each
    output takes its source (dst + 0.5) * in / out - 0.5, clamped at 0, between floor and the next index (the
    last repeats), weights in float32 as torch's."""
    src = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * np.float32(n_in / n_out)
                     - np.float32(0.5), np.float32(0))
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0).astype(np.float32)
    a = np.zeros((n_out, n_in), np.float32)
    np.add.at(a, (np.arange(n_out), i0), np.float32(1) - w1)
    np.add.at(a, (np.arange(n_out), i1), w1)
    return a


def resize_bilinear(x, size):
    """x [..., h, w] -> [..., H, W] as torch's F.interpolate(mode="bilinear", align_corners=False) (static
    sizes): two small matrix products, whose gradients are matrix products too (a gather's is a scatter)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    rows, cols = bilinear_matrix(h, size[0]), bilinear_matrix(w, size[1])
    return jnp.einsum("Hh,...hw,Ww->...HW", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
