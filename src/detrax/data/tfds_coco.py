"""TFDS `coco/2017` as a source: the same records as the COCO-format folder, read lazily from a prepared TFDS
dataset (`pip install 'detrax[tfds]'`; preparing `coco/2017` itself needs tensorflow, reading it does not).

`--data tfds:coco/2017` names it (`tfds:NAME@DATA_DIR` for a data dir other than TFDS's default). Examples are
read with the image left encoded (`tfds.decode.SkipDecoding`) and decoded with PIL like the folder source, so both
give the same pixels. TFDS stores boxes normalised as (ymin, xmin, ymax, xmax) and labels as indices into the
file's 80 categories; they are turned back into absolute xyxy boxes and COCO's category ids, and the official
rules (crowd out, clip, degenerate out) are applied as `data.coco.read_coco` does.
"""

from __future__ import annotations

import collections.abc
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from detrax.data.coco import DataError, Dataset
from detrax.data.coco_names import COCO_2017_IDS

PREFIX = "tfds:"
SPLITS = ("train", "validation")


def is_tfds(data: str) -> bool:
    return str(data).startswith(PREFIX)


def parse(data: str) -> tuple[str, str | None]:
    """'tfds:coco/2017@/data/tfds' -> ('coco/2017', '/data/tfds'); no '@': TFDS's default data dir."""
    name, _, data_dir = data[len(PREFIX):].partition("@")
    return name, data_dir or None


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def _decode_header(example: dict, where: str) -> tuple[int, int, int]:
    data, image_id = example["image"], int(example["image/id"])
    if not isinstance(data, (bytes, np.bytes_)):
        raise DataError(f"{where}: image {image_id} is not encoded bytes (read with SkipDecoding)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return image_id, *im.size
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{where}: image {image_id} is not a readable image ({e})") from None


def _objects(example: dict, width: int, height: int, ids: tuple, where: str):
    """(boxes [n, 4] absolute xyxy clipped to the image, COCO category ids [n], crowd [n], area [n])."""
    objects = example["objects"]
    ymin, xmin, ymax, xmax = np.asarray(objects["bbox"], np.float64).reshape(-1, 4).T  # normalised
    boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], -1)  # [n, 4]
    boxes = np.clip(boxes, 0, [width, height, width, height])
    labels = np.asarray(objects["label"], np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(ids)):
        raise DataError(f"{where}: image {int(example['image/id'])} has a label outside the {len(ids)} categories")
    crowd = np.asarray(objects["is_crowd"], bool).reshape(-1)
    area = np.asarray(objects.get("area", (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])), np.float64)
    return boxes, np.array(ids, np.int64)[labels], crowd, area


def record(example: dict, ids: tuple, where: str) -> dict:
    """One TFDS COCO example (image still encoded) -> a detrax record (see `data.coco.Dataset.records`)."""
    image_id, width, height = _decode_header(example, where)
    boxes, labels, crowd, _ = _objects(example, width, height, ids, where)
    keep = ~crowd & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return {"image_id": image_id, "file": f"{where}/{_text(example['image/filename'])}",
            "image_bytes": bytes(example["image"]), "width": width, "height": height,
            "boxes": boxes[keep].astype(np.float32), "labels": labels[keep].astype(np.int32)}


class Records(collections.abc.Sequence):
    """The records of a TFDS split, each read and converted when indexed (a split of COCO does not fit in
    memory); picklable when the source is, as grain's worker processes need."""

    def __init__(self, source, ids: tuple, where: str):
        self.source, self.ids, self.where = source, ids, where
        self.ground_truth: dict | None = None  # gathered once, by `ground_truth`

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return record(self.source[i], self.ids, self.where)


def _open(name: str, split: str, data_dir: str | None):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError("the TFDS source needs tensorflow-datasets: pip install 'detrax[tfds]'") from None
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # TFDS raises many kinds for a dataset that is not prepared
        raise DataError(f"{PREFIX}{name}: split {split!r} cannot be read from data dir {data_dir or '(default)'}: "
                        f"{e}. Prepare it first, e.g. tfds build {name} (needs tensorflow)") from None


def read_tfds(data: str, split: str) -> Dataset:
    """A `Dataset` over the TFDS split `split` of `data` ('tfds:coco/2017[@DATA_DIR]'), its records read lazily."""
    name, data_dir = parse(data)
    source = _open(name, split, data_dir)
    names = list(source.dataset_info.features["objects"]["label"].names)
    if len(names) != len(COCO_2017_IDS):
        raise DataError(f"{data}: {len(names)} categories; the TFDS source knows COCO 2017's 80")
    where = f"{data}/{split}"
    return Dataset(data, split, None, where, Records(source, COCO_2017_IDS, where),
                   dict(zip(COCO_2017_IDS, names)), [], {})


def ground_truth(ds: Dataset) -> dict:
    """The split's annotations as a COCO dict for pycocotools (crowd regions kept as iscrowd, TFDS's segment
    areas kept for APs/APm/APl), in one pass over the examples; `ds.counts` gains the crowd and degenerate
    counts of the training rules. Gathered once per dataset: evaluations during training reuse it."""
    records = ds.records
    assert isinstance(records, Records), "ground_truth reads a TFDS split's records"
    if records.ground_truth is not None:
        return records.ground_truth
    counts = {"crowd": 0, "degenerate": 0, "annotations": 0}
    images: list[dict] = []
    annotations: list[dict] = []
    source, ids, where = records.source, records.ids, records.where
    for i in range(len(source)):
        example = source[i]
        image_id, width, height = _decode_header(example, where)
        boxes, labels, crowd, area = _objects(example, width, height, ids, where)
        images.append({"id": image_id, "file_name": _text(example["image/filename"]), "width": width,
                       "height": height})
        for (x0, y0, x1, y1), label, is_crowd, a in zip(boxes.tolist(), labels.tolist(), crowd, area):
            if not is_crowd and not (x1 > x0 and y1 > y0):
                counts["degenerate"] += 1
                continue
            counts["crowd" if is_crowd else "annotations"] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(a), "iscrowd": int(is_crowd)})
    ds.counts.update(counts)
    records.ground_truth = {"images": images, "annotations": annotations,
                            "categories": [{"id": k, "name": v} for k, v in ds.names.items()]}
    return records.ground_truth
