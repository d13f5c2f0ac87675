"""Where a dataset comes from: a COCO-format folder (the default) or TFDS (`tfds:coco/2017[@DATA_DIR]`)."""

from __future__ import annotations

from detrax.data import coco, tfds_coco


def list_splits(data: str) -> list[str]:
    return list(tfds_coco.SPLITS) if tfds_coco.is_tfds(data) else coco.splits(data)


def read_split(data: str, split: str, skip_bad: bool = False) -> coco.Dataset:
    """`split` of `data` as a `coco.Dataset` whose records the loader, training and evaluation take."""
    if tfds_coco.is_tfds(data):
        return tfds_coco.read_tfds(data, split)
    return coco.read_coco(data, split, skip_bad=skip_bad)


def ground_truth(ds: coco.Dataset):
    """What pycocotools reads as the split's ground truth: the folder's annotation file, or TFDS's annotations
    gathered into a COCO dict."""
    return ds.annotation_file if ds.annotation_file is not None else tfds_coco.ground_truth(ds)
