"""Key tables for weight conversion: detrax weight path -> (source key, transform of the array). The transforms
turn PyTorch layouts into detrax's; the builders add a layer's entries. Used by the backbones' own tables and by
`convert`."""

from __future__ import annotations

conv = lambda w: w.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> [kh, kw, I, O]
linear = lambda w: w.T  # torch [O, I] -> [I, O]
same = lambda w: w
conv1x1 = lambda w: w[:, :, 0, 0].T  # torch [O, I, 1, 1] -> [I, O]
flat = lambda w: w.reshape(-1)  # BiT's GroupNorm gamma / beta, [C] or [1, 1, 1, C]


def bn(table: dict, dst: str, src: str) -> None:
    for a, b in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        table[f"{dst}/{a}"] = (f"{src}.{b}", same)


def dense(table: dict, dst: str, src: str) -> None:
    table[f"{dst}/kernel"] = (f"{src}.weight", linear)
    table[f"{dst}/bias"] = (f"{src}.bias", same)


def norm(table: dict, dst: str, src: str) -> None:
    table[f"{dst}/scale"] = (f"{src}.weight", same)
    table[f"{dst}/bias"] = (f"{src}.bias", same)
