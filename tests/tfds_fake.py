"""A stand-in for `tfds.data_source("coco/2017", decoders={"image": SkipDecoding()})` built from a COCO-format
folder the way TFDS's own builder (tensorflow_datasets/object_detection/coco.py, `_generate_examples`) builds its
examples: every image of the file (also those without annotations), the file's JPEG bytes, objects sorted by
annotation id, boxes normalised as (ymin, xmin, ymax, xmax) in float32, labels as the index into the file's
categories, `is_crowd` as bool, `area` cast to int64 -- in the layout TFDS's NumPy decoding returns."""

import json
import os
import types

import numpy as np


class FakeCocoSource:
    def __init__(self, root: str, split: str):
        with open(os.path.join(root, "annotations", f"instances_{split}.json")) as f:
            data = json.load(f)
        names = [c["name"] for c in data["categories"]]
        index = {c["id"]: i for i, c in enumerate(data["categories"])}
        by_image = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a)
        self.examples = []
        for im in data["images"]:
            anns = sorted(by_image.get(im["id"], []), key=lambda a: a["id"])
            w, h = im["width"], im["height"]
            bbox = [(y / h, x / w, (y + bh) / h, (x + bw) / w) for x, y, bw, bh in (a["bbox"] for a in anns)]
            with open(os.path.join(root, split, im["file_name"]), "rb") as f:
                image = f.read()
            self.examples.append({
                "image": image, "image/filename": im["file_name"].encode(), "image/id": np.int64(im["id"]),
                "objects": {"id": np.array([a["id"] for a in anns], np.int64),
                            "area": np.array([a["area"] for a in anns], np.float64).astype(np.int64),
                            "bbox": np.array(bbox, np.float32).reshape(-1, 4),
                            "label": np.array([index[a["category_id"]] for a in anns], np.int64),
                            "is_crowd": np.array([bool(a["iscrowd"]) for a in anns], bool)}})
        label = types.SimpleNamespace(names=names)
        self.dataset_info = types.SimpleNamespace(features={"objects": {"label": label}})

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]
