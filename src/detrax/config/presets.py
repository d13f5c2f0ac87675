"""Presets as plain Python functions that return a config (the big_vision way): the official recipes, the
tiny model of the tests, the demo and the small-data preset. Derived values are computed here, in code;
`smoke=True` shrinks any preset to a size that runs in seconds.
"""

from __future__ import annotations

import dataclasses

from detrax.config.schema import Config, DataConfig, LossConfig, ModelConfig, TrainConfig


def detr_r50(smoke: bool = False) -> Config:
    if smoke:
        return tiny()
    return Config("detr_r50", ModelConfig(backbone="resnet50"))


def detr_r50_dc5(smoke: bool = False) -> Config:
    cfg = detr_r50(smoke)
    return dataclasses.replace(cfg, name="detr_r50_dc5", model=dataclasses.replace(cfg.model, dilation=True))


def detr_r50_640(smoke: bool = False) -> Config:
    """MasterSkepticista/detr's DETR-R50-640 recipe (33.1 AP at 38.5 GFLOPs there): every size of the official
    augmentation scaled by 640/1333 as it does (`int(640 / 1333 * s)`), its batch of 64 (override `batch_size` to
    fit a smaller machine). The model is the official one; its checkpoints convert with `detrax convert CKPT
    OUT --preset detr_r50_640`, which records their own forward options and this val transform."""
    if smoke:
        return dataclasses.replace(tiny(), name="detr_r50_640")
    r = 640 / 1333
    d = DataConfig()
    scales = tuple(int(r * s) for s in d.scales)
    data = dataclasses.replace(d, scales=scales, max_size=640, crop_scales=tuple(int(r * s) for s in d.crop_scales),
                               crop_size=tuple(int(r * s) for s in d.crop_size), val_size=max(scales))
    return Config("detr_r50_640", ModelConfig(backbone="resnet50"), data=data, train=TrainConfig(batch_size=64))


def detr_r50_640_dc5(smoke: bool = False) -> Config:
    cfg = detr_r50_640(smoke)
    return dataclasses.replace(cfg, name="detr_r50_640_dc5", model=dataclasses.replace(cfg.model, dilation=True))


def detr_r101(smoke: bool = False) -> Config:
    if smoke:
        return tiny()
    return Config("detr_r101", ModelConfig(backbone="resnet101"))


def detr_r101_dc5(smoke: bool = False) -> Config:
    cfg = detr_r101(smoke)
    return dataclasses.replace(cfg, name="detr_r101_dc5", model=dataclasses.replace(cfg.model, dilation=True))


def detr_bit_r50(smoke: bool = False) -> Config:
    """DETR on BiT-S R50x1 (GroupNorm, weight-standardised convs), the official recipe otherwise: convert BiT's
    .npz (`detrax convert BiT-S-R50x1.npz bit_r50.safetensors`), then `detrax train --config detr_bit_r50
    --init bit_r50.safetensors`. `model.width=128` / `192` give x2 / x3."""
    if smoke:
        return dataclasses.replace(tiny(), name="detr_bit_r50", model=dataclasses.replace(tiny().model, backbone="bit"))
    return Config("detr_bit_r50", ModelConfig(backbone="bit50"))


def detr_bit_r50_dc5(smoke: bool = False) -> Config:
    cfg = detr_bit_r50(smoke)
    return dataclasses.replace(cfg, name="detr_bit_r50_dc5", model=dataclasses.replace(cfg.model, dilation=True))


def detr_bit_r101(smoke: bool = False) -> Config:
    if smoke:
        return detr_bit_r50(smoke=True)
    return Config("detr_bit_r101", ModelConfig(backbone="bit101"))


def tiny(smoke: bool = True) -> Config:
    """A DETR small enough for unit tests: same structure, a few thousand parameters."""
    del smoke
    return Config("tiny", ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=8, num_classes=5,
                                      num_queries=10, hidden_dim=32, num_heads=4, enc_layers=2, dec_layers=2,
                                      ffn_dim=64))


DEMO_SHAPE = (128, 160)  # (height, width) of `detrax demo`'s synthetic images: one batch shape, one compilation


def demo(smoke: bool = False) -> Config:
    """A small DETR-DC5 trained from scratch on the synthetic shapes (`detrax data synth`), on a CPU in minutes.
    From scratch, its frozen batch norm is calibrated on the data, every stage trains, the backbone at a fifth of
    the transformer's learning rate, without dropout or augmentation (the toy task has no pretrained features).
    Made for `detrax demo`'s 3000 training images of `DEMO_SHAPE` (one batch shape: one compilation): 4 epochs
    (1500 steps of 8), the learning rate x0.1 after 3. The class count follows the data. Training-only aids that
    leave the model (inference, export, the official weights) as it is: four query groups (Group DETR), two
    denoising groups (DN-DETR) and the encoder head, its dense losses weighted 10x (what they buy, measured:
    benchmarks/history.md)."""
    model = ModelConfig(backbone="resnet", depths=(1, 1, 1, 1), width=16, dilation=True, num_queries=16,
                        hidden_dim=64, num_heads=4, enc_layers=2, dec_layers=2, ffn_dim=128, dropout=0.0,
                        frozen_stages=0, query_groups=4, dn_groups=2, encoder_head=True)
    # buckets of 32: the demo's 128x160 images need no padding; other sizes pad less than with 64
    data = DataConfig(scales=(112, 128, 144, 160), max_size=192, crop_scales=(128, 144), crop_size=(96, 128),
                      val_size=128, max_targets=16, bucket_step=32, augment=False)
    train = TrainConfig(batch_size=8, lr=5e-4, lr_backbone=1e-4, epochs=4, lr_drop=3, ckpt_every=500,
                        eval_every=2, log_every=10, calibrate_bn=True)
    if smoke:
        train = dataclasses.replace(train, epochs=1, eval_every=1)
    # the on-device exact matcher: for a model this small, scipy's host round trip costs (benchmarks/history.md)
    return Config("demo", model, loss=LossConfig(matcher="hungarian_jax", enc_weight=10.0), data=data, train=train)


def small(smoke: bool = False) -> Config:
    """A COCO-format folder of a few hundred images, from scratch on a CPU (`detrax train --config small --data
    FOLDER`): the demo's model and training-only aids with 32 queries; every image resized to at most 192 pixels
    a side and padded to one 192x192 canvas (one batch shape, one compilation, whatever the images' sizes); the
    official augmentations (flips, scales, crops), as the images repeat for many epochs; 18000 steps whatever the
    folder's size, the learning rate x0.1 for the last 40%; first, the backbone's warm-up: 2000 steps classifying
    the folder's own objects (`training/crop_warmup.py`). The weights' moving average (decay 0.997) is kept and
    evaluated beside them: measured, it ends level with them on average, is ahead before the drop, and its worst
    seed ends higher than theirs. Its time and accuracy: benchmarks/history.md."""
    cfg = demo(smoke)
    model = dataclasses.replace(cfg.model, num_queries=32)
    data = DataConfig(scales=(128, 144, 160, 176, 192), max_size=192, crop_scales=(128, 160), crop_size=(96, 160),
                      val_size=160, max_targets=32, bucket_step=192, augment=True)
    # with `steps`, the drop falls at lr_drop / epochs of them: 3 / 5, after 60%
    train = cfg.train if smoke else dataclasses.replace(cfg.train, steps=18000, epochs=5, lr_drop=3, eval_every=10,
                                                        crop_steps=2000, ema_decay=0.997)
    return dataclasses.replace(cfg, name="small", model=model, data=data, train=train)


def detr_r50_panoptic(smoke: bool = False) -> Config:
    """The official panoptic recipe's second stage: the mask head trained on a frozen, trained detector (give its
    weights with `--init`), 25 epochs with the learning rate x0.1 after 15, on COCO panoptic data (PNG + JSON),
    the official 250 class outputs; evaluated by PQ. `model.dilation=true` for DC5, `model.backbone=resnet101`
    for R101."""
    model = dataclasses.replace(detr_r50().model, masks=True, num_classes=250)
    if smoke:  # the tiny model, wide enough for the mask head's GroupNorm
        model = dataclasses.replace(tiny().model, masks=True, hidden_dim=64, num_heads=8)
    return Config("detr_r50_panoptic", model, data=DataConfig(task="panoptic"),
                  train=TrainConfig(epochs=25, lr_drop=15, freeze_detector=True))


def demo_panoptic_detector(smoke: bool = False) -> Config:
    """The first stage of `demo_panoptic`: the demo's detector (8 attention heads, as the mask head's GroupNorm
    needs) trained on the boxes of every segment, things and stuff, of a synthetic panoptic folder (`detrax data
    synth --panoptic` writes them as instances too), as the official recipe trains its detector on COCO panoptic's
    boxes first. 12 epochs of its 1500 images, the learning rate x0.1 after 10; the encoder head's losses at
    weight 1, as when its figures (benchmarks/history.md) were measured."""
    cfg = demo(smoke)
    train = cfg.train if smoke else dataclasses.replace(cfg.train, epochs=12, lr_drop=10, eval_every=4)
    return dataclasses.replace(cfg, name="demo_panoptic_detector", model=dataclasses.replace(cfg.model, num_heads=8),
                               loss=dataclasses.replace(cfg.loss, enc_weight=1.0), train=train)


def demo_panoptic(smoke: bool = False) -> Config:
    """The second stage: the mask head trained on the frozen `demo_panoptic_detector` (`--init` its run) over the
    same synthetic panoptic folder; evaluated by PQ. The official head and losses, with the first convolution's
    kernel on the attention channels initialised 1000 times larger (`model.mask_attention_gain`): with the
    official init the masks do not tell the queries apart within a CPU's minutes (benchmarks/history.md)."""
    cfg = demo_panoptic_detector(smoke)
    train = dataclasses.replace(cfg.train, freeze_detector=True, calibrate_bn=False)
    if not smoke:
        train = dataclasses.replace(train, epochs=4, lr_drop=3, eval_every=2)
    return dataclasses.replace(cfg, name="demo_panoptic", train=train,  # the detector's training-only aids off
                               model=dataclasses.replace(cfg.model, masks=True, mask_attention_gain=1000.0,
                                                         dn_groups=0, encoder_head=False),
                               data=dataclasses.replace(cfg.data, task="panoptic"))


PRESETS = {f.__name__: f for f in (detr_r50, detr_r50_dc5, detr_r50_640, detr_r50_640_dc5, detr_r101, detr_r101_dc5,
                                   detr_bit_r50, detr_bit_r50_dc5, detr_bit_r101, tiny, demo, small, detr_r50_panoptic,
                                   demo_panoptic_detector, demo_panoptic)}


def get(name: str, smoke: bool = False) -> Config:
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name](smoke=smoke)
