"""What the model looked at: the last decoder layer's cross-attention for each detection, and the encoder's
self-attention at chosen points, drawn as PNG panels in the manner of the DETR paper's figures."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw


def forward_with_attention(model, pixels, mask):
    """(outputs, decoder cross-attention [B, Q, h, w], encoder self-attention [B, h*w, h, w]), head-averaged."""
    dec = model.transformer.decoder[-1].cross_attn
    enc = model.transformer.encoder[-1].self_attn
    dec.record_weights = enc.record_weights = True
    try:
        out, inter = _captured(model, pixels, mask)
    finally:
        dec.record_weights = enc.record_weights = False
    b = pixels.shape[0]
    h, w = jax.eval_shape(model.backbone, jax.ShapeDtypeStruct(pixels.shape, model.dtype)).shape[1:3]
    cross = inter["transformer"]["decoder"][len(model.transformer.decoder) - 1]["cross_attn"]["weights"][0]
    selfa = inter["transformer"]["encoder"][len(model.transformer.encoder) - 1]["self_attn"]["weights"][0]
    return (out, cross.mean(1).reshape(b, -1, h, w).astype(np.float32),  # [B, Q, h, w]
            selfa.mean(1).reshape(b, h * w, h, w).astype(np.float32))  # [B, h*w, h, w]


@nnx.jit
def _captured(model, pixels, mask):
    """The model's outputs and its recorded intermediates, compiled as one program."""
    return nnx.capture(model, nnx.Intermediate)(pixels, mask)


def _heat(att: np.ndarray, size: tuple[int, int]) -> Image.Image:
    a = att - att.min()
    a = (255 * a / max(float(a.max()), 1e-12)).astype(np.uint8)
    rgb = np.stack([a, (a * 0.6).astype(np.uint8), 255 - a], -1)  # blue (low) to orange (high)
    return Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)


def panel(image: Image.Image, maps: list[np.ndarray], boxes: list, titles: list[str], valid_hw) -> Image.Image:
    """One row per map: the image with its box or point, then the attention over the image."""
    tile = 256
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size)
    vh, vw = valid_hw
    rows = Image.new("RGB", (2 * size[0] + 12, max(1, len(maps)) * (size[1] + 20)), (255, 255, 255))
    pen = ImageDraw.Draw(rows)
    for i, (att, box, title) in enumerate(zip(maps, boxes, titles)):
        y = i * (size[1] + 20)
        left = small.copy()
        d = ImageDraw.Draw(left)
        if len(box) == 4:
            d.rectangle([v * scale for v in box], outline=(255, 40, 40), width=2)
        else:
            x0, y0 = box[0] * scale, box[1] * scale
            d.ellipse((x0 - 4, y0 - 4, x0 + 4, y0 + 4), fill=(255, 40, 40))
        rows.paste(left, (0, y + 18))
        rows.paste(_heat(att[:vh, :vw], size), (size[0] + 12, y + 18))
        pen.text((2, y + 3), title, fill=(0, 0, 0))
    return rows


def valid_cells(resized_hw, canvas_hw, feature_hw) -> tuple[int, int]:
    """Feature cells that cover the image rather than its padding."""
    return tuple(min(f, math.ceil(r * f / c)) for r, c, f in zip(resized_hw, canvas_hw, feature_hw))


def attention_panels(model, image: Image.Image, batch: dict, det: dict, points=None) -> Image.Image:
    """batch: the image alone, as the inference path pads it (`infer.batches([image], prep, 1)`); det: its
    detections with `queries`. One row per detection (decoder cross-attention of its query), then one per point
    (x, y in image pixels; encoder self-attention at that cell)."""
    from detrax.serving.infer import normalized

    rh, rw = (int(v) for v in batch["size"][0])
    ch, cw = batch["pixels"].shape[1:3]
    mask = batch["mask"][:1]
    _, cross, selfa = forward_with_attention(model, normalized(model, batch["pixels"][:1], mask), mask)
    cross, selfa = np.asarray(cross[0]), np.asarray(selfa[0])
    fh, fw = cross.shape[1:]
    vh, vw = valid_cells((rh, rw), (ch, cw), (fh, fw))
    maps, boxes, titles = [], [], []
    for q, box, score, name in zip(det["queries"], det["boxes"], det["scores"], det.get("names", det["labels"])):
        maps.append(cross[int(q)])
        boxes.append([float(v) for v in box])
        titles.append(f"query {int(q)}: {name} {float(score):.2f}")
    for px, py in points or []:
        cy = min(vh - 1, int(py / image.height * vh))
        cx = min(vw - 1, int(px / image.width * vw))
        maps.append(selfa[cy * fw + cx])
        boxes.append([px, py])
        titles.append(f"encoder self-attention at ({px:.0f}, {py:.0f})")
    return panel(image, maps, boxes, titles, (vh, vw))
