"""The grain input pipeline: shuffle, shard by process, decode and augment, bucketed batches, prefetch in
worker processes, and an iterator state that checkpoints and restores exactly."""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np

from detrax.config.schema import DataConfig
from detrax.data import transforms as T
from detrax.data.batching import Collate, group_by_shape
from detrax.data.coco import DataError, load_image, record_masks
from detrax.data.coco_panoptic import load_masks, masks_to_boxes


@dataclasses.dataclass(frozen=True)
class Augment:
    """The official transforms for one record, with the sizes of `data` (`data.augment` False: the val transform,
    in the training order); picklable, for worker processes."""

    train: bool
    data: DataConfig = DataConfig()

    def planned_size(self, record, rng: np.random.Generator | None = None) -> tuple[int, int]:
        """The (height, width) this transform gives `record` with `rng` (the same draws), from the record's
        size alone."""
        h, w = record["height"], record["width"]
        if self.train and self.data.augment:
            return T.train_plan(h, w, rng, self.data)[1]
        return T.resized_size(w, h, self.data.val_size, self.data.max_size)

    def __call__(self, record, rng: np.random.Generator | None = None):
        image = load_image(record)
        target = {"boxes": record["boxes"], "labels": record["labels"], "image_id": record["image_id"],
                  "orig_size": (record["height"], record["width"])}
        if "panoptic_png" in record:  # every segment's mask, and its box around it (the official CocoPanoptic)
            target["masks"] = load_masks(record)
            target["boxes"] = masks_to_boxes(target["masks"])
        elif self.data.task == "segm":  # the annotations' polygons or RLE (the official ConvertCocoPolysToMask)
            target["masks"] = record_masks(record)
        if self.train and self.data.augment:
            return T.train_transform(image, target, rng, self.data)
        return T.val_transform(image, target, self.data.val_size, self.data.max_size)


def dataset(records, augment: Augment, batch_size: int, *, max_targets: int, step: int = 128, seed: int = 0,
            shard: tuple[int, int] = (0, 1), epochs: int | None = None, group: int = 64,
            multiple: int = 1) -> grain.MapDataset:
    """Training (`augment.train`): this process's shard, reshuffled every epoch, repeated `epochs` times (None:
    forever), full batches of images of like shapes (`ShapeGroupedBatches` over windows of `group` batches; 1:
    batches in the shuffled order), an epoch's remainder dropped. Evaluation: once, each image padded to its own
    shape bucket (`batching.group_by_shape`, as `infer.batches` does for image files), images of one bucket
    batched together in order, a short batch filled with blanks to `multiple` (the devices) times a power of two
    (`batching.fill_size`)."""
    index, count = shard
    source = lambda i: grain.MapDataset.source(records)[i::count]  # host i's shard
    if augment.train:  # every host's batches are planned, for one padded shape per step (see ShapeGroupedBatches)
        shards = [ShapeGroupedBatches(source(i), augment, batch_size, Collate(max_targets, step), group, seed, i,
                                      epochs) for i in range(count)]
        if count > 1:
            shards[index].shards = shards
        return shards[index]
    ids = list(range(index, len(records), count))
    groups = group_by_shape([augment.planned_size(records[i]) for i in ids], step, batch_size)
    return grain.MapDataset.source([[ids[j] for j in g] for g in groups]).map(
        EvalBatch(records, augment, Collate(max_targets, step, batch_size, multiple)))


@dataclasses.dataclass(frozen=True)
class EvalBatch:
    """Record indices -> one collated evaluation batch; picklable, for worker processes."""

    records: Sequence
    augment: Augment
    collate: Collate

    def __call__(self, indices):
        return self.collate([self.augment(self.records[i]) for i in indices])


class ShapeGroupedBatches(grain.MapDataset):
    """Training batches of images whose augmented shapes are alike, so that little of each padded batch is
    padding. Every image keeps its own random draws (the official per-image scales and crops): the shape each
    will have is planned from its size alone (`Augment.planned_size`, the same draws as the transform). Each
    epoch (the records of `parent` in an order of its own, `epochs` times; None: forever) is cut into windows of
    `window` x `batch_size` images; a window is sorted by orientation and height, cut in strips of 4 batches
    sorted by width, and cut into batches, whose order within the window is shuffled again. Each image is seen once per
    epoch (the remainder of an epoch, fewer than `batch_size` images, is dropped, as the official loader does);
    batch `i` is a pure function of `i`, so the loader's state stays an index and resumes exactly. Measured by
    benchmarks/bench_data.py.

    On several hosts, each reads its own shard (`shard`), and the batches that form one global step must have
    one shape: `shards` (every host's dataset, which each host can plan, as the records are known to all) gives
    the padded shape of step `i` as the largest planned over the hosts. The window's batches are shuffled with
    a key common to the hosts, after sorting, so that step `i` draws alike shapes on every host."""

    STRIP = 4  # batches per strip of the second sort

    def __init__(self, parent: grain.MapDataset, augment: Augment, batch_size: int, collate: Collate, window: int,
                 seed: int, shard: int = 0, epochs: int | None = None):
        super().__init__(parent)
        self.epoch_size, self.augment, self.batch_size, self.collate = len(parent), augment, batch_size, collate
        self.per_epoch, self.epochs = self.epoch_size // batch_size, epochs
        self.window, self.seed, self.shard = max(1, window), seed, shard
        self.shards: list[ShapeGroupedBatches] | None = None  # on several hosts: every host's ShapeGroupedBatches
        self._cache: dict = {}
        self._lock = threading.RLock()  # the last windows' plans and epochs' orders; prefetch threads share them

    def __getstate__(self):  # for worker processes: no lock, no cache
        return {**self.__dict__, "_cache": {}, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return sys.maxsize if self.epochs is None else self.epochs * self.per_epoch

    def _record(self, position: int) -> dict:
        """The record at `position` of the endless sequence of epochs, each in an order of its own: a permutation
        drawn once per epoch (grain's `shuffle()` draws each index alone, 9.5 ms each for 4 records, 1.3 ms for 20:
        most of a small run's loading)."""
        epoch, k = divmod(position, self.epoch_size)
        return self._parent[int(self._kept(("order", epoch), lambda: np.random.default_rng(
            (self.seed, self.shard, epoch, 2)).permutation(self.epoch_size))[k])]

    def _kept(self, key, make):
        with self._lock:
            if key not in self._cache:
                self._cache[key] = make()
                while len(self._cache) > 8:
                    del self._cache[next(iter(self._cache))]  # the oldest
            return self._cache[key]

    def __str__(self) -> str:
        return f"ShapeGroupedBatches(batch_size={self.batch_size}, window={self.window})"

    def _rng(self, position: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.shard, position))

    def _batches(self, epoch: int, w: int) -> list[list[tuple]]:
        """(position, planned shape) of the images of each batch of window `w` of `epoch`."""
        return self._kept(("plan", epoch, w), lambda: self._plan(epoch, w))

    def _plan(self, epoch: int, w: int) -> list[list[tuple]]:
        b, n = self.batch_size, self.window * self.batch_size
        start = epoch * self.epoch_size
        positions = range(start + w * n, start + min((w + 1) * n, self.per_epoch * b))
        shapes = {p: self.augment.planned_size(self._record(p), self._rng(p)) for p in positions}
        order = sorted(shapes, key=lambda p: (shapes[p][0] >= shapes[p][1], shapes[p][0]))
        strips = [sorted(order[i:i + self.STRIP * b], key=lambda p: shapes[p][1])
                  for i in range(0, len(order), self.STRIP * b)]
        flat = [p for strip in strips for p in strip]
        batches = [flat[i:i + b] for i in range(0, len(flat), b)]
        perm = np.random.default_rng((self.seed, epoch, w, 1)).permutation(len(batches))  # common to the hosts
        return [[(p, shapes[p]) for p in batches[i]] for i in perm]

    def planned(self, index: int) -> list[tuple]:
        """(position, planned (height, width)) of the images of batch `index`."""
        epoch, j = divmod(index, self.per_epoch)
        w, slot = divmod(j, self.window)
        return self._batches(epoch, w)[slot]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        members = self.planned(index)
        examples = [self.augment(self._record(p), self._rng(p)) for p, _ in members]
        if self.shards is None:
            return self.collate(examples)
        shape = np.max([hw for ds in self.shards for _, hw in ds.planned(index)], 0)  # [2]: every host's largest
        for (p, planned), (x, t) in zip(members, examples):
            if tuple(x.shape[:2]) != tuple(planned):
                record = self._record(p)
                raise DataError(f"image {t['image_id']} ({record['file']}): its annotation says "
                                f"{record['width']}x{record['height']} but the image decodes to another size; "
                                "on several hosts batch shapes are planned from the annotations: fix its size")
        return self.collate(examples, shape=tuple(int(v) for v in shape))


class Loader:
    """Iterates batches from `dataset(...)`, decoded ahead by `threads` threads (of each of `workers` processes,
    which each keep `buffer` batches ready), twice as many batches ahead as threads. Tracks the padding waste
    and the distinct batch shapes; `state()` / `restore(state)` give exact resumption."""

    def __init__(self, ds: grain.MapDataset, workers: int = 0, buffer: int = 2, threads: int = 2):
        # a few batches ahead, not grain's default 500 on 16 threads: a training run that draws from an endless
        # dataset would decode 500 batches it never uses, beside its own steps (11 s of CPU in a 12-step run of
        # the demo's images, 0.4 s with 4 ahead on 2 threads), and hold them all in memory (COCO's: gigabytes)
        it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, 2 * threads)))
        if workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a library must not parse argv
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer))
        self._iter = iter(it)
        self.shapes: set = set()
        self._real = self._canvas = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iter)
        self.shapes.add(batch["pixels"].shape)
        real = batch["real"]
        self._real += int(np.prod(batch["size"][real], axis=-1).sum())  # each image's own (unpadded) pixels
        self._canvas += int(real.sum()) * batch["mask"][0].size
        return batch

    @property
    def padding_waste(self) -> float:
        return 1.0 - self._real / max(1, self._canvas)

    def close(self) -> None:
        """Stop the worker processes (also on exit from a `with` block)."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def state(self):
        return self._iter.get_state()

    def restore(self, state) -> None:
        self._iter.set_state(state)
