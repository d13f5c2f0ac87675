"""The backbone registry. A backbone family is one module file and one `register` call: configs validate
`model.backbone` against it, `model.DETR` builds from it, training asks it whether the family's frozen
normalisation calibrates on data, and `convert` reads the family's published weights through it.

A backbone module has `out_channels`, `__call__(pixels [B, H, W, 3], mask [B, H, W]) -> features [B, h, w, C]`
(stride 32, 16 with DC5), `stages(pixels, mask=None, calibrate=False) -> [each stage's output]` and
`pyramid(pixels, mask) -> [the first three stages' outputs, the features]` (the mask head's inputs, one pass).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from detrax.config import checks


@dataclasses.dataclass(frozen=True)
class WeightsFormat:
    """A family's published backbone weights (a backbone alone: the rest of DETR starts fresh)."""

    name: str  # as `convert` reports it, e.g. "torchvision"
    recognise: Callable[[dict], bool]  # state dict -> whether it is this format
    config_fields: Callable[[dict], dict]  # state dict -> the config fields it fixes (depths, width)
    table: Callable[..., dict]  # ModelConfig -> key table (detrax path -> (source key, transform))


@dataclasses.dataclass(frozen=True)
class Backbone:
    family: str  # `model.backbone=family` takes any depths; a variant name fixes them
    build: Callable  # (ModelConfig, nnx.Rngs) -> module
    variants: dict = dataclasses.field(default_factory=dict)  # name -> depths, e.g. resnet50 -> (3, 4, 6, 3)
    calibrates: bool = False  # `stages(..., calibrate=True)` sets its frozen statistics from a batch
    weights: WeightsFormat | None = None


FAMILIES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> None:
    FAMILIES[backbone.family] = backbone


def names() -> list[str]:
    return [n for b in FAMILIES.values() for n in (*b.variants, b.family)]


def get(name: str) -> Backbone:
    """The family of a backbone name (a family or one of its variants)."""
    for b in FAMILIES.values():
        if name == b.family or name in b.variants:
            return b
    raise ValueError(f"unknown backbone {name!r}; one of {', '.join(names())}")


def variant_depths(name: str) -> tuple | None:
    """The depths a variant name fixes (None for a family name)."""
    return get(name).variants.get(name)


def resolve(cfg) -> dict:
    """`ModelConfig`'s check: its backbone is registered, and a variant name's depths fill or match `depths`."""
    family, fixed = get(cfg.backbone).family, variant_depths(cfg.backbone)
    if fixed is not None and cfg.depths and tuple(cfg.depths) != tuple(fixed):
        raise ValueError(f"backbone {cfg.backbone!r} has depths {tuple(fixed)}, not {tuple(cfg.depths)}; use "
                         f"backbone={family!r} for custom depths")
    if not cfg.depths and fixed is None:
        raise ValueError(f"backbone {cfg.backbone!r} takes any depths: set model.depths")
    return {"depths": tuple(cfg.depths or fixed or ())}


checks.register("ModelConfig", resolve)


def name_for(family: str, depths, standard_width: bool = True) -> str:
    """The variant of `family` with these depths (when the width is the standard one), else the family."""
    found = (n for n, d in FAMILIES[family].variants.items() if tuple(d) == tuple(depths))
    return next(found, family) if standard_width else family


def count(keys, pattern: str) -> int:
    """1 + the largest integer that `pattern`'s group captures over `keys` (0 if none match)."""
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# ------------------------------------------------------------------------------------------- the built-ins

def _resnet(c, rngs):
    from detrax.models.backbones.resnet import ResNet

    return ResNet(c.depths, c.width, c.dilation, c.frozen_stages, rngs=rngs)


def _torchvision_config(sd: dict) -> dict:
    depths = tuple(count(sd, rf"layer{i + 1}\.(\d+)\.") for i in range(4))
    width = sd["conv1.weight"].shape[0]
    return {"backbone": name_for("resnet", depths, width == 64), "depths": depths, "width": width}


def _torchvision_table(cfg) -> dict:
    from detrax.models.backbones.resnet import weights_table

    return weights_table(cfg.depths)


def _bit(c, rngs):
    from detrax.models.backbones.bit import BiTResNet

    return BiTResNet(c.depths, c.width, c.dilation, c.frozen_stages, rngs=rngs)


def _bit_config(sd: dict) -> dict:
    from detrax.models.backbones.bit import ROOT_KEY

    depths = tuple(count(sd, rf"resnet/block{i + 1}/unit(\d+)/") - 1 for i in range(4))  # units from 01
    if min(depths) <= 0:
        raise ValueError(f"no BiT ResNet found in the .npz (units per block {depths})")
    return {"backbone": name_for("bit", depths), "depths": depths, "width": sd[ROOT_KEY].shape[-1]}


def _bit_table(cfg) -> dict:
    from detrax.models.backbones.bit import weights_table

    return weights_table(cfg.depths)


register(Backbone(
    "resnet", _resnet, {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}, calibrates=True,
    weights=WeightsFormat("torchvision", lambda sd: "conv1.weight" in sd and any(k.startswith("layer1.0.") for k in sd),
                          _torchvision_config, _torchvision_table)))
register(Backbone(
    "bit", _bit, {"bit50": (3, 4, 6, 3), "bit101": (3, 4, 23, 3)},
    weights=WeightsFormat("bit", lambda sd: "resnet/root_block/standardized_conv2d/kernel" in sd, _bit_config,
                          _bit_table)))
