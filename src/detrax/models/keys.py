"""Key tables for weight conversion: detrax weight path -> (source key, transform of the array). The transforms
turn PyTorch layouts into detrax's (`torch_layout` turns them back); the builders add a layer's entries. Used by
the backbones' own tables, by `convert` and by `to_torch`."""

from __future__ import annotations

import numpy as np

conv = lambda w: w.transpose(2, 3, 1, 0)  # torch [O, I, kh, kw] -> [kh, kw, I, O]
linear = lambda w: w.T  # torch [O, I] -> [I, O]
same = lambda w: w
conv1x1 = lambda w: w[:, :, 0, 0].T  # torch [O, I, 1, 1] -> [I, O]
flat = lambda w: w.reshape(-1)  # BiT's GroupNorm gamma / beta, [C] or [1, 1, 1, C]


class Rows:
    """Rows `rows` of a stacked torch tensor (the official attention's `in_proj` of q, k and v, [3 D, D] and
    [3 D]) as detrax's kernel [D, D] (`kernel`) or bias [D]."""

    def __init__(self, rows: slice, kernel: bool):
        self.rows, self.kernel = rows, kernel

    def __call__(self, w):
        return w[self.rows].T if self.kernel else w[self.rows]


_BACK = {id(conv): lambda w: w.transpose(3, 2, 0, 1), id(linear): lambda w: w.T, id(same): same,
         id(conv1x1): lambda w: w.T[:, :, None, None]}


def torch_layout(table: dict, arrays: dict) -> dict:
    """The inverse of a key table: detrax's {path: array} -> the source's {key: array} (every entry of `table`
    read; a stacked source tensor gathered from its rows)."""
    out: dict = {}
    for dst, (src, fn) in table.items():
        a = arrays[dst]
        if isinstance(fn, Rows):
            part = a.T if fn.kernel else a
            full = out.setdefault(src, [None, None, None])
            full[fn.rows.start // part.shape[0]] = part
        elif id(fn) in _BACK:
            out[src] = _BACK[id(fn)](a)
        else:
            raise ValueError(f"{dst}: its transform to {src} has no inverse here")
    return {k: np.concatenate(v) if isinstance(v, list) else np.ascontiguousarray(v) for k, v in out.items()}


def bn(table: dict, dst: str, src: str) -> None:
    for a, b in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        table[f"{dst}/{a}"] = (f"{src}.{b}", same)


def dense(table: dict, dst: str, src: str) -> None:
    table[f"{dst}/kernel"] = (f"{src}.weight", linear)
    table[f"{dst}/bias"] = (f"{src}.bias", same)


def norm(table: dict, dst: str, src: str) -> None:
    table[f"{dst}/scale"] = (f"{src}.weight", same)
    table[f"{dst}/bias"] = (f"{src}.bias", same)
