"""Where a dataset comes from. A source names its splits, reads one as a `coco.Dataset` (the records the loader,
training and evaluation take) and gives its ground truth for pycocotools. Sources are tried in order, the last
registered first, among those that serve the task (`data.task`: detection | segm | panoptic): TFDS claims
`tfds:coco/2017[@DATA_DIR]`, a YOLO folder (`data.yolo`: Ultralytics' or Roboflow's YOLO layout) and a Pascal
VOC folder (`data.voc`) theirs, the COCO-format folder (COCO layout or a Roboflow export) everything else, also
for instance masks; for panoptic segmentation, the COCO panoptic folder. A new source is a class with these
four methods (and `tasks`, the tasks it serves; detection alone without it) and one `register_source` call."""

from __future__ import annotations

import dataclasses
import types
from typing import Protocol

from detrax.data import coco, coco_panoptic, tfds_coco, voc, yolo

TASKS = ("detection", "segm", "panoptic")


class Source(Protocol):
    tasks: tuple[str, ...]

    def claims(self, data: str) -> bool: ...

    def splits(self, data: str) -> list[str]: ...

    def read(self, data: str, split: str, skip_bad: bool = False) -> coco.Dataset: ...

    def ground_truth(self, ds: coco.Dataset) -> str | dict:
        """A COCO annotation file or dict; reading it may complete `ds.counts` (crowd, degenerate)."""
        ...


class CocoFolder:
    tasks: tuple[str, ...] = ("detection", "segm")

    def claims(self, data: str) -> bool:
        return True

    def splits(self, data: str) -> list[str]:
        return coco.splits(data)

    def read(self, data: str, split: str, skip_bad: bool = False) -> coco.Dataset:
        return coco.read_coco(data, split, skip_bad=skip_bad)

    def ground_truth(self, ds: coco.Dataset) -> str | dict:
        assert ds.annotation_file is not None
        return ds.annotation_file


class Tfds:
    tasks: tuple[str, ...] = ("detection",)

    def claims(self, data: str) -> bool:
        return tfds_coco.is_tfds(data)

    def splits(self, data: str) -> list[str]:
        return list(tfds_coco.SPLITS)

    def read(self, data: str, split: str, skip_bad: bool = False) -> coco.Dataset:
        return tfds_coco.read_tfds(data, split)

    def ground_truth(self, ds: coco.Dataset) -> str | dict:
        return tfds_coco.ground_truth(ds)


class Converted:
    """A folder of another format, read into a COCO dict (`to_coco`) and then by COCO's rules: the dict is the
    split's ground truth."""

    tasks: tuple[str, ...] = ("detection",)
    module: types.ModuleType  # its claims, splits and to_coco

    def claims(self, data: str) -> bool:
        return self.module.claims(data)

    def splits(self, data: str) -> list[str]:
        return self.module.splits(data)

    def read(self, data: str, split: str, skip_bad: bool = False) -> coco.Dataset:
        found, problems, image_dir = self.module.to_coco(data, split, skip_bad)
        return coco.from_dict(found, data, split, image_dir, None, skip_bad, problems=problems)

    def ground_truth(self, ds: coco.Dataset) -> str | dict:
        assert ds.ground_truth is not None
        return ds.ground_truth


class Yolo(Converted):
    module = yolo


class Voc(Converted):
    module = voc


class CocoPanopticFolder:
    tasks: tuple[str, ...] = ("panoptic",)

    def claims(self, data: str) -> bool:
        return True

    def splits(self, data: str) -> list[str]:
        return coco_panoptic.splits(data)

    def read(self, data: str, split: str, skip_bad: bool = False) -> coco.Dataset:
        return coco_panoptic.read_panoptic(data, split, skip_bad=skip_bad)

    def ground_truth(self, ds: coco.Dataset) -> str | dict:
        assert ds.annotation_file is not None
        return ds.annotation_file  # the panoptic JSON, its PNGs beside it (coco_panoptic.layout)


SOURCES: list[Source] = [Tfds(), Yolo(), Voc(), CocoFolder(), CocoPanopticFolder()]


def register_source(source: Source) -> None:
    """Try `source` before the others."""
    SOURCES.insert(0, source)


def source_of(data: str, task: str = "detection") -> Source:
    if task not in TASKS:
        raise ValueError(f"data.task must be one of {', '.join(TASKS)}, not {task!r}")
    found = next((s for s in SOURCES if task in getattr(s, "tasks", ("detection",)) and s.claims(data)), None)
    if found is None:
        raise ValueError(f"{data}: no data source serves data.task={task} for it")
    return found


def list_splits(data: str, task: str = "detection") -> list[str]:
    return source_of(data, task).splits(data)


def read_split(data: str, split: str, skip_bad: bool = False, task: str = "detection") -> coco.Dataset:
    """`split` of `data` as a `coco.Dataset` (its `root` is `data`) for `task`."""
    ds = source_of(data, task).read(data, split, skip_bad=skip_bad)
    if ds.task != task:  # instance masks: the detection records, their polygons decoded by the loader
        ds = dataclasses.replace(ds, task=task)
    return ds


def ground_truth(ds: coco.Dataset) -> str | dict:
    """What pycocotools reads as the split's ground truth (gathered once per dataset where it is computed); for
    panoptic data, the panoptic JSON."""
    return source_of(ds.root, ds.task).ground_truth(ds)


def resolve_split(data: str, want: str, prefix: str, task: str = "detection") -> str:
    """The split `want`, or for `auto` the first split of `data` whose name starts with `prefix` (train, val)."""
    if want != "auto":
        return want
    found = list_splits(data, task)
    match = [s for s in found if s.startswith(prefix)]
    if not match:
        raise ValueError(f"{data}: no split named {prefix}* among {found}; set data.{prefix}_split")
    return match[0]
