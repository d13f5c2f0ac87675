"""torchvision-layout ResNet (bottleneck, stride on the 3x3 conv) with frozen batch norm, NHWC.

As in the official DETR, batch norm is frozen everywhere, and the stem and layer1 are not trained: their
kernels are `Frozen` variables, not `nnx.Param`, so an optimizer built with `wrt=nnx.Param` never sees them
and autodiff computes no backward pass below layer2. DC5 replaces the stride of the last stage by dilation.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from detrax.models import keys


class Frozen(nnx.Variable):
    """A parameter that training leaves alone (frozen batch norm statistics, the stem and layer1)."""


_kaiming_fan_out = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Conv(nnx.Module):
    """Bias-free 2D convolution with torch's symmetric padding; kernel [kh, kw, in, out]."""

    def __init__(self, cin: int, cout: int, k: int, *, stride: int = 1, dilation: int = 1, padding: int = 0,
                 trainable: bool = True, rngs: nnx.Rngs):
        var = nnx.Param if trainable else Frozen
        self.kernel = var(_kaiming_fan_out(rngs.params(), (k, k, cin, cout), jnp.float32))
        self.stride, self.dilation, self.padding = stride, dilation, padding

    def __call__(self, x):  # x [B, H, W, Cin] -> [B, H', W', Cout]
        return conv2d(x, self.kernel[...].astype(x.dtype), self.stride, self.dilation, self.padding)


def conv2d(x, kernel, stride: int = 1, dilation: int = 1, padding: int = 0):
    """x [B, H, W, Cin], kernel [kh, kw, Cin, Cout] -> [B, H', W', Cout]. An unpadded 1x1 convolution is a
    matrix product over the channels (of every `stride`-th pixel): the same numbers, and on the CPU its weight
    gradient is a plain GEMM instead of XLA's transposed convolution (several times faster in training). Written
    as a product of two matrices (pixels x channels), an ONNX export carries it as a MatMul, which the runtimes
    quantize and run faster than the Einsum a 4-D product becomes."""
    if kernel.shape[:2] == (1, 1) and padding == 0:
        if stride > 1:  # every stride-th pixel; the stops spell out the size as the convolution's (H - 1) // s + 1
            # so that symbolic sizes agree (export); a strided slice, which ONNX carries as a Slice (an indexing
            # with steps became a GatherND, whose rank OpenVINO could not tell after int8 quantization)
            h, w = ((n - 1) // stride * stride + 1 for n in x.shape[1:3])
            x = jax.lax.slice(x, (0, 0, 0, 0), (x.shape[0], h, w, x.shape[3]), (1, stride, stride, 1))  # [B, H', W', C]
        b, h, w, cin = x.shape
        return (x.reshape(-1, cin) @ kernel[0, 0]).reshape(b, h, w, kernel.shape[-1])  # [B, H', W', Cout]
    p = padding
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(p, p), (p, p)],
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def max_pool(x, pad_value):
    """The stem's 3x3 max pool, stride 2, padding 1 (filled with `pad_value`). With static sizes (training,
    inference, fixed-shape exports) a reduce_window: the numbers, and their gradient, bitwise those of the
    padded reduce_window before (a test); with symbolic sizes (exports of any size) the maximum of nine strided
    slices, whose output size jax2onnx gets right: the same values."""
    x = jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], constant_values=pad_value)  # [B, H + 2, W + 2, C]
    if all(isinstance(d, int) for d in x.shape):
        return nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")  # [B, h, w, C]
    h, w = (x.shape[1] - 1) // 2, (x.shape[2] - 1) // 2
    rows = [x[:, i:i + 2 * h - 1:2] for i in range(3)]  # [B, h, W + 2, C] each
    x = jnp.maximum(jnp.maximum(rows[0], rows[1]), rows[2])
    cols = [x[:, :, j:j + 2 * w - 1:2] for j in range(3)]  # [B, h, w, C] each
    return jnp.maximum(jnp.maximum(cols[0], cols[1]), cols[2])


class FrozenBatchNorm(nnx.Module):
    """BatchNorm2d with fixed statistics and affine parameters; eps 1e-5 inside the rsqrt, as the official."""

    def __init__(self, n: int):
        self.scale = Frozen(jnp.ones((n,), jnp.float32))
        self.bias = Frozen(jnp.zeros((n,), jnp.float32))
        self.mean = Frozen(jnp.zeros((n,), jnp.float32))
        self.var = Frozen(jnp.ones((n,), jnp.float32))

    def affine(self):
        """(scale, bias) [C] each: the normalisation as one multiply-add."""
        scale = self.scale[...] * jax.lax.rsqrt(self.var[...] + 1e-5)  # [C]
        return scale, self.bias[...] - self.mean[...] * scale

    def __call__(self, x):  # x [B, H, W, C]
        scale, bias = self.affine()
        return x * scale.astype(x.dtype) + bias.astype(x.dtype)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, *, stride: int, dilation: int, downsample: bool, trainable: bool,
                 rngs: nnx.Rngs):
        kw: dict[str, Any] = dict(trainable=trainable, rngs=rngs)
        self.conv1 = Conv(cin, planes, 1, **kw)
        self.bn1 = FrozenBatchNorm(planes)
        self.conv2 = Conv(planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, **kw)
        self.bn2 = FrozenBatchNorm(planes)
        self.conv3 = Conv(planes, planes * 4, 1, **kw)
        self.bn3 = FrozenBatchNorm(planes * 4)
        if downsample:
            self.downsample_conv: Conv | None = Conv(cin, planes * 4, 1, stride=stride, **kw)
            self.downsample_bn: FrozenBatchNorm | None = FrozenBatchNorm(planes * 4)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x, calibrate: bool = False):
        cb = lambda conv, bn, v: _conv_bn(conv, bn, v, calibrate)
        y = jax.nn.relu(cb(self.conv1, self.bn1, x))
        y = jax.nn.relu(cb(self.conv2, self.bn2, y))
        y = cb(self.conv3, self.bn3, y)
        shortcut = x if self.downsample_conv is None else cb(self.downsample_conv, self.downsample_bn, x)
        return jax.nn.relu(y + shortcut)


def _conv_bn(conv, bn, x, calibrate: bool):
    """bn(conv(x)), with the frozen normalisation folded into the kernel: conv(x, kernel * scale) + bias. The
    same function, one pass over the activations fewer each way (the CPU is memory-bound there)."""
    if calibrate:  # data-dependent initialisation: the frozen statistics become this batch's
        y = conv(x)
        bn.mean[...] = y.mean((0, 1, 2))
        bn.var[...] = y.var((0, 1, 2))
        return bn(y)
    scale, bias = bn.affine()
    kernel = (conv.kernel[...] * scale).astype(x.dtype)  # [kh, kw, Cin, Cout]
    return conv2d(x, kernel, conv.stride, conv.dilation, conv.padding) + bias.astype(x.dtype)


class ResNet(nnx.Module):
    """Stem (conv1, bn1, max pool) and four stages `layer1`..`layer4`, named as torchvision's; returns C5."""

    def __init__(self, depths=(3, 4, 6, 3), width: int = 64, dilation: bool = False, frozen_stages: int = 1, *,
                 rngs: nnx.Rngs):
        self.conv1 = Conv(3, width, 7, stride=2, padding=3, trainable=frozen_stages == 0, rngs=rngs)
        self.bn1 = FrozenBatchNorm(width)
        cin, current_dilation = width, 1
        for i, depth in enumerate(depths):
            planes, stride = width * 2**i, (1 if i == 0 else 2)
            first_dilation = current_dilation
            if dilation and i == len(depths) - 1:  # torchvision's replace_stride_with_dilation for the last stage
                current_dilation, stride = current_dilation * stride, 1  # its first block keeps the old one
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(
                    cin, planes, stride=stride if j == 0 else 1,
                    dilation=first_dilation if j == 0 else current_dilation,
                    downsample=j == 0 and (stride != 1 or cin != planes * 4), trainable=i + 1 > frozen_stages,
                    rngs=rngs))
                cin = planes * 4
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.num_stages = len(depths)
        self.out_channels = cin

    def stages(self, x, mask=None, calibrate: bool = False):
        """x [B, H, W, 3] -> the outputs of layer1..layer4, at strides 4, 8, 16, 32 (16 for layer4 with DC5).
        With `calibrate` (eagerly, outside jit), every frozen batch norm first takes the mean and variance of its
        input over this batch: a normalised start for a backbone trained from scratch."""
        x = jax.nn.relu(_conv_bn(self.conv1, self.bn1, x, calibrate))
        x = max_pool(x, -jnp.inf)  # torch's max pool pads with -inf
        outs = []
        for i in range(self.num_stages):
            for block in getattr(self, f"layer{i + 1}"):
                x = block(x, calibrate)
            outs.append(x)
        return outs

    def __call__(self, x, mask=None):  # x [B, H, W, 3] -> C5 [B, H/32, W/32, C] (H/16 with DC5); mask unused
        return self.stages(x, mask)[-1]

    def pyramid(self, x, mask=None):
        """layer1..layer3's outputs and the features `__call__` returns, from one pass."""
        return self.stages(x, mask)


def weights_table(depths, prefix: str = "", hf: bool = False) -> dict:
    """The key table of this ResNet from torchvision names (conv1, layer1.0.conv1, ...; behind `prefix` in the
    official DETR checkpoints), or HF ResNetBackbone names (embedder, encoder.stages)."""
    t = {}

    def conv_bn(dst_conv, dst_bn, src_conv, src_bn):
        t[f"{dst_conv}/kernel"] = (f"{src_conv}.weight", keys.conv)
        keys.bn(t, dst_bn, src_bn)

    stem = f"{prefix}embedder.embedder." if hf else prefix
    conv_bn("backbone/conv1", "backbone/bn1", *((stem + "convolution", stem + "normalization") if hf
                                                  else (stem + "conv1", stem + "bn1")))
    for i, depth in enumerate(depths):
        for j in range(depth):
            dst = f"backbone/layer{i + 1}/{j}"
            if hf:
                src = f"{prefix}encoder.stages.{i}.layers.{j}."
                units = [(f"{src}layer.{k}.convolution", f"{src}layer.{k}.normalization") for k in range(3)]
                down = (f"{src}shortcut.convolution", f"{src}shortcut.normalization")
            else:
                src = f"{prefix}layer{i + 1}.{j}."
                units = [(f"{src}conv{k + 1}", f"{src}bn{k + 1}") for k in range(3)]
                down = (f"{src}downsample.0", f"{src}downsample.1")
            for k, (c, b) in enumerate(units):
                conv_bn(f"{dst}/conv{k + 1}", f"{dst}/bn{k + 1}", c, b)
            if j == 0:  # every stage's first block projects its shortcut
                conv_bn(f"{dst}/downsample_conv", f"{dst}/downsample_bn", *down)
    return t
