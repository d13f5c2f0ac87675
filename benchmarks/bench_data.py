"""The training input pipeline on the real COCO images of tests/data/coco-tiny: images per second with 0, 1
and 2 worker processes, and the padding waste of shape buckets against padding each batch to its own maximum
(a new shape almost every batch) and to the worst case 1333 x 1333 (one shape), for the loader's shape-grouped
batches (`--group`, the default) and for batches in shuffled order (no grouping), in the same run.

    .venv/bin/python benchmarks/bench_data.py [--batches 40] [--batch-size 2] [--step 128]
"""

import argparse
import os
import time

import record

from detrax.data.batching import bucket_shape
from detrax.data.coco import read_coco
from detrax.data.loader import Augment, Loader, dataset

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "coco-tiny")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--step", type=int, default=64)
    p.add_argument("--group", type=int, default=64, help="batches per shape-grouping window (1: none)")
    p.add_argument("--data", default=ROOT)
    args = p.parse_args()
    records = read_coco(args.data, "train2017").records
    ds = dataset(records, Augment(True), args.batch_size, max_targets=100, step=args.step, seed=0,
                 group=args.group)
    figures = {}
    for workers in (0, 1, 2):
        with Loader(ds, workers=workers) as loader:
            next(loader)  # start-up (worker processes) is not throughput
            t0 = time.perf_counter()
            sizes = []
            for _ in range(args.batches):
                batch = next(loader)
                sizes.append(batch["size"].tolist())
            dt = time.perf_counter() - t0
        ips = args.batches * args.batch_size / dt
        figures[f"images_per_s_{workers}_workers"] = round(ips, 2)
        print(f"{workers} workers: {ips:.1f} images/s", flush=True)
    shuffled = dataset(records, Augment(True), args.batch_size, max_targets=100, step=args.step, seed=0, group=1)
    with Loader(shuffled, workers=0) as loader:
        shuffled_sizes = [next(loader)["size"].tolist() for _ in range(args.batches)]

    def waste(sizes, shape_of):
        real, canvas, shapes = sum(h * w for batch in sizes for h, w in batch), 0, set()
        for batch in sizes:
            shape = shape_of(max(h for h, _ in batch), max(w for _, w in batch))
            shapes.add(shape)
            canvas += len(batch) * shape[0] * shape[1]
        return 1 - real / canvas, len(shapes)

    for order, batches in (("", sizes), ("_shuffled", shuffled_sizes)):
        for name, fn in (("buckets", lambda h, w: bucket_shape(h, w, args.step)), ("batch_max", lambda h, w: (h, w)),
                         ("worst_case_1333", lambda h, w: (1333, 1333))):
            w, n = waste(batches, fn)
            figures[f"padding_waste_{name}{order}"], figures[f"shapes_{name}{order}"] = round(w, 4), n
            print(f"padding {name + order:25s} waste {w:6.1%}  distinct shapes {n}")
    figures["speedup_2_workers"] = round(figures["images_per_s_2_workers"] / figures["images_per_s_0_workers"], 2)
    record.finish(figures)


if __name__ == "__main__":
    main()
