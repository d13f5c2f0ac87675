"""The grain input pipeline: shuffle, shard by process, decode and augment, bucketed batches, prefetch in
worker processes, and an iterator state that checkpoints and restores exactly."""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from detrax.data import transforms as T
from detrax.data.batching import Collate
from detrax.data.coco import load_image


@dataclasses.dataclass(frozen=True)
class Augment:
    """The official transforms for one record; picklable, for worker processes."""

    train: bool
    augment: bool = True  # with train: False applies the val transform but keeps the training order
    scales: tuple = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    crop_scales: tuple = (400, 500, 600)
    crop_size: tuple = (384, 600)
    val_size: int = 800

    def __call__(self, record, rng: np.random.Generator | None = None):
        image = load_image(record)
        target = {"boxes": record["boxes"], "labels": record["labels"], "image_id": record["image_id"],
                  "orig_size": (record["height"], record["width"])}
        if self.train and self.augment:
            return T.train_transform(image, target, rng, self.scales, self.max_size, self.crop_scales,
                                     self.crop_size)
        return T.val_transform(image, target, self.val_size, self.max_size)


def dataset(records, augment: Augment, batch_size: int, *, max_targets: int, step: int = 128, seed: int = 0,
            shard: tuple[int, int] = (0, 1), epochs: int | None = None) -> grain.MapDataset:
    """Training (`augment.train`): this process's shard, reshuffled every epoch, repeated `epochs` times (None:
    forever), full batches. Evaluation: in order, once, the last batch filled with blanks."""
    index, count = shard
    ds = grain.MapDataset.source(records)[index::count]
    if augment.train:
        ds = ds.seed(seed).shuffle().repeat(epochs).random_map(augment)
        return ds.batch(batch_size, drop_remainder=True, batch_fn=Collate(max_targets, step))
    return ds.map(augment).batch(batch_size, batch_fn=Collate(max_targets, step, batch_size))


class Loader:
    """Iterates batches from `dataset(...)`, with `workers` processes decoding ahead. Tracks the padding waste
    and the distinct batch shapes; `state()` / `restore(state)` give exact resumption."""

    def __init__(self, ds: grain.MapDataset, workers: int = 0, buffer: int = 2):
        it = ds.to_iter_dataset()
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
        self._real += int(batch["mask"][real].sum())
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
