"""Image files in, drawings and COCO results out: read, list, draw, write. The detections come from the one
inference path (`infer`)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_image(path: str) -> Image.Image:
    """An RGB image with its EXIF orientation applied; ValueError naming the file if it cannot be read."""
    return _read(path, path)


def decode_image(data: bytes, name: str = "the upload") -> Image.Image:
    """`read_image` of an encoded image's bytes (an upload); ValueError naming `name` if it cannot be decoded
    (not an image, truncated, more pixels than PIL's decompression-bomb limit)."""
    return _read(io.BytesIO(data), name)


def _read(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            im.load()
            return ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not a readable image (not a format PIL reads)") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: not a readable image ({e})") from None


def read_all(files: list[str]) -> tuple[list, list, list]:
    """(the images that could be read, their files, [(file, why not)] for the others)."""
    images, kept, skipped = [], [], []
    for f in files:
        try:
            images.append(read_image(f))
            kept.append(f)
        except (ValueError, FileNotFoundError) as e:
            skipped.append((f, str(e)))
    return images, kept, skipped


def to_rgb(im) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> an RGB PIL image."""
    if isinstance(im, (str, os.PathLike)):
        return read_image(os.fspath(im))
    return im.convert("RGB") if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, np.uint8))


def list_images(paths) -> list[str]:
    """Files as given, and the image files of folders (sorted)."""
    out = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            out += sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
        else:
            out.append(p)
    return out


def _color(label: int) -> tuple[int, int, int]:
    rs = np.random.default_rng(label * 7919 + 13)
    r, g, b = (int(c) for c in rs.integers(60, 256, 3))
    return r, g, b


def draw(image: Image.Image, det: dict, names: dict) -> Image.Image:
    """The image with each detection's box, name and score."""
    out = image.copy()
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, min(out.size) // 40))
    width = max(2, min(out.size) // 250)
    for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
        color = _color(int(label))
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle((x0, y0, x1, y1), outline=color, width=width)
        text = f"{names.get(int(label), label)} {score:.2f}"
        tx0, ty0, tx1, ty1 = pen.textbbox((x0, y0), text, font=font)
        ty = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        pen.rectangle((x0, ty, x0 + tx1 - tx0 + 4, ty + ty1 - ty0 + 2), fill=color)
        pen.text((x0 + 2, ty - (ty0 - y0)), text, fill=(0, 0, 0), font=font)
    return out


def coco_results(files, dets, names) -> list[dict]:
    """COCO results format (bbox as x, y, w, h), with the file and category names alongside."""
    out = []
    for image_id, (f, det) in enumerate(zip(files, dets)):
        stem = os.path.splitext(os.path.basename(f))[0]
        iid = int(stem) if stem.isdigit() else image_id
        for box, score, label in zip(det["boxes"], det["scores"], det["labels"]):
            x0, y0, x1, y1 = (float(v) for v in box)
            out.append({"image_id": iid, "file_name": os.path.basename(f), "category_id": int(label),
                        "category_name": names.get(int(label), str(int(label))),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 5)})
    return out


def write_results(out_dir: str, files, images, dets, names) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(coco_results(files, dets, names), f)
    for file, im, det in zip(files, images, dets):
        stem = os.path.splitext(os.path.basename(file))[0]
        draw(im, det, names).save(os.path.join(out_dir, f"{stem}.jpg"), quality=92)
    return path


def draw_segments(image: Image.Image, ids, segments: list, alpha: float = 0.55) -> Image.Image:
    """The image with each panoptic segment filled in its category's colour (`ids` [H, W], `segments` as
    `panoptic.panoptic_segments` gives with names) and its name at its centre."""
    ids = np.asarray(ids)
    colours = np.zeros((int(ids.max(initial=0)) + 1, 3), np.float32)
    for s in segments:
        colours[s["id"]] = _color(int(s["category_id"]))
    pixels = np.asarray(image, np.float32)
    painted = np.where(ids[..., None] > 0, (1 - alpha) * pixels + alpha * colours[ids], pixels)
    out = Image.fromarray(painted.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(10, min(out.size) // 40))
    for s in segments:
        ys, xs = np.nonzero(ids == s["id"])
        if len(xs):
            pen.text((float(xs.mean()), float(ys.mean())), s.get("name", str(s["category_id"])), fill=(0, 0, 0),
                     font=font, anchor="mm", stroke_width=1, stroke_fill=(255, 255, 255))
    return out


def draw_masks(image: Image.Image, det: dict, names: dict, alpha: float = 0.5) -> Image.Image:
    """The image with each detection's mask (`det["masks"]` [N, H, W]) tinted, then its box and label."""
    pixels = np.asarray(image, np.float32)
    for m, label in zip(det["masks"], det["labels"]):
        pixels = np.where(m[..., None], (1 - alpha) * pixels + alpha * np.array(_color(int(label))), pixels)
    return draw(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), det, names)


def write_panoptic(out_dir: str, files, images, results) -> str:
    """Per image `<stem>.png` (segment ids as RGB, COCO panoptic) and `<stem>.jpg` (drawn), and `panoptic.json`
    (COCO panoptic annotations: file_name, segments_info)."""
    from detrax.data.masks import id2rgb

    os.makedirs(out_dir, exist_ok=True)
    annotations = []
    for image_id, (file, im, r) in enumerate(zip(files, images, results)):
        stem = os.path.splitext(os.path.basename(file))[0]
        Image.fromarray(id2rgb(r["ids"])).save(os.path.join(out_dir, f"{stem}.png"))
        draw_segments(im, r["ids"], r["segments"]).save(os.path.join(out_dir, f"{stem}.jpg"), quality=92)
        info = [{"id": s["id"], "category_id": s["category_id"], "category_name": s.get("name"),
                 "isthing": int(s["isthing"]), "area": s["area"], "score": round(s["score"], 5)} for s in r["segments"]]
        annotations.append({"image_id": int(stem) if stem.isdigit() else image_id, "file_name": f"{stem}.png",
                            "segments_info": info})
    path = os.path.join(out_dir, "panoptic.json")
    with open(path, "w") as f:
        json.dump({"annotations": annotations}, f)
    return path


def write_instances(out_dir: str, files, images, dets, names) -> str:
    """COCO results with each detection's mask as RLE (`segmentation`), and drawn images."""
    from detrax.data.masks import rle_encode

    os.makedirs(out_dir, exist_ok=True)
    results = coco_results(files, dets, names)
    rles = [rle for d in dets if len(d["masks"]) for rle in rle_encode(d["masks"])]
    for r, rle in zip(results, rles, strict=True):
        r["segmentation"] = rle
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f)
    for file, im, det in zip(files, images, dets):
        stem = os.path.splitext(os.path.basename(file))[0]
        draw_masks(im, det, names).save(os.path.join(out_dir, f"{stem}.jpg"), quality=92)
    return path
