"""The config dataclasses that every wing reads, with their defaults (the official DETR's): plain data, checked
on construction by their own rules and by the names the registries above register (`config.checks`). Strings
become values in `config.overrides`; the presets that fill them are `config.presets`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from detrax.config import checks


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the model's parameters and its forward pass."""

    # a name of the backbone registry (models/backbones/registry): torchvision ResNet: resnet50 | resnet101 | resnet
    # (custom depths / width, e.g. the tiny preset); BiT ResNet v2 (GroupNorm, weight standardisation): bit50 |
    # bit101 | bit (custom); width 64 is BiT's x1
    backbone: str = "resnet50"
    depths: tuple[int, ...] = ()  # bottleneck blocks per stage; () for a named variant: its own (resnet50: 3, 4, 6, 3)
    width: int = 64  # channels of the stem; stage i has width * 2**i planes and 4x that many outputs
    dilation: bool = False  # DC5: dilation instead of stride in the last stage
    # the class head has num_classes + 1 outputs, the last no-object; auto: the training data's largest category
    # id + 1 when a run starts (a resumed run keeps its own); a model is built from a number
    num_classes: int | str = "auto"
    # the category id of each class output, in order; (): the output index is the id (detrax's and the official
    # layout). Weights converted from MasterSkepticista/detr keep its 80 outputs and name their COCO ids here
    class_ids: tuple[int, ...] = ()
    num_queries: int = 100
    # Group DETR (Chen et al. 2023), training only: query groups of num_queries each, every group decoded on its
    # own (self-attention within the group) and matched one-to-one to the targets on its own, their losses summed.
    # Inference runs the first group, the official `query_embed`; the others (`group_queries`) are training-only
    # weights. 1: the official DETR
    query_groups: int = 1
    # DN-DETR's denoising (Li et al. 2022), training only (`denoising.py`): this many groups of every target's box
    # and label, noised (centres moved by up to dn_box_noise x half the size, sizes scaled by 1 +- dn_box_noise,
    # labels redrawn with probability dn_label_noise), decoded as extra queries that must give the targets back
    # (no matching); their weights (`denoising/`) are training-only. 0: the official DETR
    dn_groups: int = 0
    dn_box_noise: float = 0.4
    dn_label_noise: float = 0.2
    # dense supervision of the encoder (`encoder_head.py`, after Co-DETR's auxiliary heads), training only: every
    # memory token inside a target box is trained to give its class and box, the others no-object, and every token
    # its own centre (`loss_enc`); `encoder_head/` weights, run in training only. False: the official DETR
    encoder_head: bool = False
    hidden_dim: int = 256
    num_heads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.1  # on residual branches, the FFN and the attention weights, as the official model
    pre_norm: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    attention: str = "xla"  # xla | dot_product (jax.nn.dot_product_attention: cuDNN flash on GPU) | auto
    frozen_stages: int = 1  # 1: stem and layer1 not trained (official, for a pretrained backbone); 0: train all
    # where a model differs from the official one without changing its weights' shapes (weights converted from
    # MasterSkepticista/detr record theirs): the input's normalisation (mean and std of [0, 1] RGB), the
    # transformer's LayerNorm epsilon, and how the padding mask is brought to the feature map: torch (as
    # F.interpolate's nearest) | half_pixel (as jax.image.resize's nearest: pixel centres)
    pixel_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    pixel_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    norm_eps: float = 1e-5
    mask_resize: str = "torch"
    # the official mask head (DETRsegm) on top of the detector: `pred_masks` [B, Q, H/4, W/4] from an attention
    # map of the last decoder layer's queries over the encoder memory and the backbone's layer1-3 features
    masks: bool = False
    # training from scratch only (loaded weights replace it): the mask head's first convolution's kernel on the
    # attention channels scaled at initialisation. An attention map sums to 1 over heads and pixels, so its
    # entries start near 1 / (num_heads * h * w), a thousandth of the projected features beside them, and the
    # official init (1) leaves the head blind to which query it masks for a long time; about num_heads * h * w
    # makes a uniform map unit scale (the demo's 1000: benchmarks/history.md)
    mask_attention_gain: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(self.depths))
        if self.num_classes != "auto":
            try:
                object.__setattr__(self, "num_classes", int(self.num_classes))
            except ValueError:
                raise ValueError(f"num_classes must be a number or auto, not {self.num_classes!r}") from None
            if self.num_classes < 1:
                raise ValueError(f"num_classes must be at least 1, not {self.num_classes}")
        object.__setattr__(self, "class_ids", tuple(int(i) for i in self.class_ids))
        if self.class_ids and (self.num_classes != len(self.class_ids) or len(set(self.class_ids)) < len(self.class_ids)
                               or min(self.class_ids) < 0):
            raise ValueError(f"class_ids must name {self.num_classes} distinct category ids (>= 0), one per class "
                             f"output; got {len(self.class_ids)}: {self.class_ids[:8]}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"hidden_dim {self.hidden_dim} is not divisible by num_heads {self.num_heads}")
        if self.masks:  # GroupNorm of 8 groups (fewer below 8 channels) over each of the mask head's widths
            widths = [self.hidden_dim + self.num_heads] + [self.hidden_dim // 2**i for i in range(1, 5)]
            if any(c < 1 or (c >= 8 and c % 8) for c in widths):
                raise ValueError(f"model.masks needs mask-head widths (hidden_dim + num_heads, hidden_dim / 2 ... "
                                 f"/ 16) that are multiples of 8 or below 8; hidden_dim {self.hidden_dim} and "
                                 f"num_heads {self.num_heads} give {widths}")
        if self.mask_resize not in ("torch", "half_pixel"):
            raise ValueError(f"mask_resize must be torch or half_pixel, not {self.mask_resize!r}")
        if self.query_groups < 1:
            raise ValueError(f"query_groups must be at least 1, not {self.query_groups}")
        if self.dn_groups < 0 or not 0 <= self.dn_label_noise <= 1 or self.dn_box_noise < 0:
            raise ValueError(f"dn_groups must be at least 0 (got {self.dn_groups}), dn_label_noise in [0, 1] (got "
                             f"{self.dn_label_noise}), dn_box_noise at least 0 (got {self.dn_box_noise})")
        for name in ("pixel_mean", "pixel_std"):  # tuples of floats, also when read back from JSON lists
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ValueError(f"pixel_mean and pixel_std are three numbers (RGB; std > 0), not {self.pixel_mean} and "
                             f"{self.pixel_std}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, not {self.dtype!r}")
        checks.apply(self)  # the backbone, the attention kernel: their registries' checks

    def with_classes(self) -> ModelConfig:
        """This config with a number of classes: `auto` with no training data to follow becomes COCO's 91."""
        return self if self.num_classes != "auto" else dataclasses.replace(self, num_classes=91)

    @property
    def backbone_channels(self) -> int:
        return self.width * 2 ** (len(self.depths) - 1) * 4


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The official criterion: matcher cost weights, loss weights, no-object weight, auxiliary losses."""

    # hungarian (exact, host) | hungarian_jax (exact, on device) | sinkhorn | sinkhorn_ott (MasterSkepticista/detr's)
    matcher: str = "hungarian"
    eos_coef: float = 0.1
    ce_weight: float = 1.0
    bbox_weight: float = 5.0
    giou_weight: float = 2.0
    cost_class: float = 1.0
    cost_bbox: float = 5.0
    cost_giou: float = 2.0
    aux_loss: bool = True
    # with a mask head: sigmoid focal and dice losses of the last layer's matched masks (the official's 1 and 1)
    mask_weight: float = 1.0
    dice_weight: float = 1.0
    enc_weight: float = 1.0  # with `model.encoder_head`: its dense losses' weight in the total

    def __post_init__(self):
        checks.apply(self)  # the matcher: the registry's check


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The official augmentations' sizes, batching, and where the splits are."""

    scales: tuple[int, ...] = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, ...] = (384, 600)
    val_size: int = 800
    max_targets: int = 100  # target slots per image (at most num_queries)
    bucket_step: int = 64  # padded sides are multiples of this
    group_batches: int = 64  # training batches are formed from images of like shapes, over windows of this many
    workers: int = 0  # 0: decode in threads of this process; N: N worker processes
    augment: bool = True  # False: training images get the val transform (for overfitting checks)
    train_split: str = "auto"  # auto: the split named train*, else the first
    val_split: str = "auto"  # auto: the split named val*; none: no evaluation
    # detection (boxes: COCO instances folders, Roboflow, TFDS) | segm (their polygons / RLE as instance masks:
    # box and mask AP) | panoptic (COCO panoptic folders: every segment's mask; PQ); the latter two for a model
    # with a mask head
    task: str = "detection"
    skip_bad: bool = False  # bad labels and images skipped and counted (the run says how many), not an error


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The official recipe: AdamW, lr 1e-4 (backbone 1e-5), weight decay 1e-4, clip 0.1, lr x0.1 at epoch 200."""

    batch_size: int = 2  # global, over all devices and hosts
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    epochs: int = 300
    lr_drop: int = 200  # epoch at which the learning rate drops x0.1
    steps: int = 0  # > 0: the run's length in steps, overriding epochs (lr_drop scales with it)
    seed: int = 42
    ckpt_every: int = 1000  # steps; a checkpoint is also written at the end
    keep: int = 3  # checkpoints kept
    eval_every: int = 1  # epochs; 0: only at the end
    log_every: int = 20  # steps
    calibrate_bn: bool = False  # from scratch: set the frozen batch-norm statistics from a first batch
    # a fresh start's backbone warm-up (`crop_warmup.py`): this many steps of classifying the training objects
    # before the detector's first step, at this learning rate
    crop_steps: int = 0
    crop_lr: float = 1e-3
    # only the mask head trains (the official second stage for segmentation, `--frozen_weights`): start from a
    # trained detector with --init
    freeze_detector: bool = False
    max_bad_steps: int = 5  # a step with a non-finite loss or gradient is skipped; this many in a row stop the run
    # an exponential moving average of the trained weights (0: none), its decay warmed up over about `ema_tau`
    # steps (decay * (1 - exp(-updates / ema_tau)), as RF-DETR's); evaluated beside the raw weights, kept in the
    # optimizer state (`training/optim.py`), and the weights a run's `last` means
    ema_decay: float = 0.0
    ema_tau: int = 100
    # keep the best evaluated weights by this eval metric (AP, AP50, ..., PQ; "": none) in the workdir's best/,
    # raw or EMA, whichever scored higher (`training/best.py`); `detrax.load(RUN, weights="best")`
    keep_best: str = ""
    early_stop: int = 0  # > 0: stop after this many evaluations without a new best `keep_best`

    def __post_init__(self):
        if self.crop_steps < 0 or not self.crop_lr > 0:
            raise ValueError(f"crop_steps must be at least 0 (got {self.crop_steps}) and crop_lr above 0 (got "
                             f"{self.crop_lr})")
        if not 0 <= self.ema_decay < 1 or self.ema_tau < 0:
            raise ValueError(f"ema_decay must be in [0, 1) (got {self.ema_decay}) and ema_tau at least 0 (got "
                             f"{self.ema_tau})")
        if self.early_stop < 0:
            raise ValueError(f"early_stop must be at least 0 (got {self.early_stop})")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    model: ModelConfig
    loss: LossConfig = LossConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(fields)}")
    return ModelConfig(**d)


def model_config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """The inverse of `to_dict` (tuples restored), failing on unknown keys."""
    sections = {"model": ModelConfig, "loss": LossConfig, "data": DataConfig, "train": TrainConfig}
    kwargs = {"name": d["name"]}
    for key, cls in sections.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d.get(key, {})) - fields)
        if unknown:
            raise ValueError(f"unknown {key} config keys {unknown}; valid keys: {sorted(fields)}")
        kwargs[key] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get(key, {}).items()})
    return Config(**kwargs)
