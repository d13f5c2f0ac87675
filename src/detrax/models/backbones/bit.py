"""BiT (BigTransfer) ResNet v2, NHWC: pre-activation bottlenecks, GroupNorm (32 groups, eps 1e-5) and
weight-standardised convolutions, as in google-research/big_transfer (BiT-S/M R50x1, R101x1, x2, x3).

The root is a 7x7/2 conv, zero padding of 1 and a 3x3/2 max pool; each unit is GN-ReLU -> (projection) ->
1x1 -> GN-ReLU -> 3x3 (stride) -> GN-ReLU -> 1x1, plus the shortcut; the body ends with BiT's pre-head GN-ReLU,
so DETR sees normalised features. Group statistics are taken over the image only, never its padding (`mask`),
and the padding is zeroed before every conv, so an image's features, and DETR's detections, do not depend on
the canvas it was padded into (a test); on an unpadded image this is exactly BiT. The root and block1 are
`Frozen` below `frozen_stages`, as the ResNet backbone's stem and layer1.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from detrax.models import keys
from detrax.models.backbones.resnet import Conv, Frozen, max_pool

ROOT_KEY = "resnet/root_block/standardized_conv2d/kernel"  # the root conv of BiT's published .npz


class StdConv(Conv):
    """A bias-free conv whose kernel is standardised (zero mean, unit variance over [kh, kw, in]) when used."""

    def __call__(self, x):
        w = self.kernel[...]
        w = w - w.mean((0, 1, 2), keepdims=True)
        w = w * jax.lax.rsqrt(jnp.mean(w * w, (0, 1, 2), keepdims=True) + 1e-10)
        p = self.padding
        return jax.lax.conv_general_dilated(
            x, w.astype(x.dtype), (self.stride, self.stride), [(p, p), (p, p)],
            rhs_dilation=(self.dilation, self.dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class GroupNorm(nnx.Module):
    """GroupNorm over the real pixels: `mask` [B, H, W] True on the image (None: everywhere). 32 groups, or
    fewer for the narrow channel counts of test-sized models."""

    def __init__(self, n: int, groups: int = 32, trainable: bool = True):
        groups = math.gcd(n, groups)
        var = nnx.Param if trainable else Frozen
        self.scale = var(jnp.ones((n,), jnp.float32))
        self.bias = var(jnp.zeros((n,), jnp.float32))
        self.groups = groups

    def __call__(self, x, mask=None):  # x [B, H, W, C]
        b, h, w, c = x.shape
        xg = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)  # [B, H, W, G, C/G]
        m = jnp.ones((b, h, w), jnp.float32) if mask is None else mask.astype(jnp.float32)
        m = m[:, :, :, None, None]  # [B, H, W, 1, 1]
        count = m.sum((1, 2, 4), keepdims=True) * (c // self.groups)  # [B, 1, 1, 1, 1]
        mean = (xg * m).sum((1, 2, 4), keepdims=True) / count  # [B, 1, 1, G, 1]
        var = (jnp.square(xg - mean) * m).sum((1, 2, 4), keepdims=True) / count
        y = ((xg - mean) * jax.lax.rsqrt(var + 1e-5)).reshape(b, h, w, c)
        y = y * self.scale[...] + self.bias[...]
        if mask is not None:  # zeros on the padding: the next conv sees what it sees past an unpadded image's edge
            y = y * m[..., 0]
        return y.astype(x.dtype)


class Unit(nnx.Module):
    """BiT's PreActBottleneck; `downsample` is the projection shortcut (BiT's `a/proj`)."""

    def __init__(self, cin: int, planes: int, *, stride: int, dilation: int, trainable: bool, rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(trainable=trainable, rngs=rngs)
        self.gn1 = GroupNorm(cin, trainable=trainable)
        self.conv1 = StdConv(cin, planes, 1, **kw)
        self.gn2 = GroupNorm(planes, trainable=trainable)
        self.conv2 = StdConv(planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, **kw)
        self.gn3 = GroupNorm(planes, trainable=trainable)
        self.conv3 = StdConv(planes, planes * 4, 1, **kw)
        needs = stride != 1 or cin != planes * 4
        self.downsample = StdConv(cin, planes * 4, 1, stride=stride, **kw) if needs else None
        self.stride = stride

    def __call__(self, x, mask):  # mask [B, H, W] at x's resolution
        y = jax.nn.relu(self.gn1(x, mask))
        shortcut = x if self.downsample is None else self.downsample(y)
        y = self.conv1(y)
        y = self.conv2(jax.nn.relu(self.gn2(y, mask)))
        mask = mask[:, ::self.stride, ::self.stride]
        y = self.conv3(jax.nn.relu(self.gn3(y, mask)))
        return y + shortcut, mask


class BiTResNet(nnx.Module):
    """`root` conv and `block1`..`block4` of units, then the pre-head `norm`; width = 64 x the width factor."""

    def __init__(self, depths=(3, 4, 6, 3), width: int = 64, dilation: bool = False, frozen_stages: int = 1, *,
                 rngs: nnx.Rngs):
        self.root = StdConv(3, width, 7, stride=2, padding=3, trainable=frozen_stages == 0, rngs=rngs)
        cin, current = width, 1
        for i, depth in enumerate(depths):
            planes, stride = width * 2**i, (1 if i == 0 else 2)
            first = current
            if dilation and i == len(depths) - 1:  # DC5, as torchvision's replace_stride_with_dilation
                current, stride = current * stride, 1
            units = []
            for j in range(depth):
                units.append(Unit(cin, planes, stride=stride if j == 0 else 1, dilation=first if j == 0 else current,
                                  trainable=i + 1 > frozen_stages, rngs=rngs))
                cin = planes * 4
            setattr(self, f"block{i + 1}", nnx.List(units))
        self.norm = GroupNorm(cin)
        self.num_stages = len(depths)
        self.out_channels = cin

    def _body(self, x, mask):
        mask = jnp.ones(x.shape[:3], bool) if mask is None else mask
        x = self.root(x * mask[..., None].astype(x.dtype))  # [B, H/2, W/2, C]
        x = x * mask[:, ::2, ::2, None].astype(x.dtype)
        x = max_pool(x, 0.0)  # BiT pads with zeros, not -inf, before its max pool
        mask = mask[:, ::4, ::4]
        outs = []
        for i in range(self.num_stages):
            for unit in getattr(self, f"block{i + 1}"):
                x, mask = unit(x, mask)
            outs.append(x)
        return outs, mask

    def stages(self, x, mask=None, calibrate: bool = False):
        """x [B, H, W, 3] -> block1..block4 outputs (pre-activation: not normalised), strides 4, 8, 16, 32.
        GroupNorm has no statistics to calibrate."""
        if calibrate:
            raise ValueError("a BiT backbone has no frozen statistics to calibrate (train.calibrate_bn=false)")
        return self._body(x, mask)[0]

    def __call__(self, x, mask=None):  # x [B, H, W, 3] -> [B, H/32, W/32, C], GN-ReLU'd (H/16 with DC5)
        return self.pyramid(x, mask)[-1]

    def pyramid(self, x, mask=None):
        """block1..block3's outputs and the features `__call__` returns, from one pass."""
        outs, mask = self._body(x, mask)
        return outs[:-1] + [jax.nn.relu(self.norm(outs[-1], mask))]


def weights_table(depths) -> dict:
    """BigTransfer's published .npz names (`resnet/block1/unit01/a/group_norm/gamma`, ...); kernels are HWIO."""
    t = {"backbone/root/kernel": (ROOT_KEY, keys.same)}
    gn = lambda dst, src: t.update({f"{dst}/scale": (f"{src}/group_norm/gamma", keys.flat),
                                    f"{dst}/bias": (f"{src}/group_norm/beta", keys.flat)})
    for i, depth in enumerate(depths):
        for j in range(depth):
            dst, src = f"backbone/block{i + 1}/{j}", f"resnet/block{i + 1}/unit{j + 1:02d}"
            for k, part in enumerate("abc"):
                gn(f"{dst}/gn{k + 1}", f"{src}/{part}")
                t[f"{dst}/conv{k + 1}/kernel"] = (f"{src}/{part}/standardized_conv2d/kernel", keys.same)
            if j == 0:  # every block's first unit projects its shortcut
                t[f"{dst}/downsample/kernel"] = (f"{src}/a/proj/standardized_conv2d/kernel", keys.same)
    gn("backbone/norm", "resnet")
    return t
