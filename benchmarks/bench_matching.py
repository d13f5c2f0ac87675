"""Matching all 6 decoder layers: the official loop against detrax's matchers, on the CPU.

(a) official: per layer, the cost over the flattened batch (as facebookresearch/detr's HungarianMatcher), one
    transfer to the host, then one scipy call per image; (b) `hungarian`: per-image costs and ONE host call for
    every layer and image; (c) `hungarian_jax` on device; (d) `sinkhorn` on device. Each includes its cost
    computation. 100 queries, 91 classes, 1 to 50 targets per image.

    .venv/bin/python benchmarks/bench_matching.py [--repeats 7]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import record
from scipy.optimize import linear_sum_assignment

from detrax.criterion import matching
from detrax.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

L, N, C, M = 6, 100, 91, 50


def make(b, seed=0):
    rs = np.random.default_rng(seed)
    logits = rs.normal(size=(L, b, N, C + 1)).astype(np.float32)
    boxes = np.concatenate([rs.uniform(0.1, 0.9, (L, b, N, 2)), rs.uniform(0.02, 0.3, (L, b, N, 2))], -1)
    tboxes = np.concatenate([rs.uniform(0.1, 0.9, (b, M, 2)), rs.uniform(0.02, 0.3, (b, M, 2))], -1)
    labels = rs.integers(0, C, (b, M))
    valid = np.arange(M)[None, :] < rs.integers(1, M + 1, (b, 1))
    return logits, boxes.astype(np.float32), labels, tboxes.astype(np.float32), valid


@jax.jit
def official_cost(logits, boxes, tgt_ids, tgt_boxes):
    """facebookresearch/detr models/matcher.py: [B * N, T] over the whole batch's targets."""
    prob = jax.nn.softmax(logits.reshape(-1, logits.shape[-1]), -1)  # [B * N, C + 1]
    out_bbox = boxes.reshape(-1, 4)  # [B * N, 4]
    cost_class = -prob[:, tgt_ids]  # [B * N, T]
    cost_bbox = jnp.abs(out_bbox[:, None] - tgt_boxes[None]).sum(-1)  # [B * N, T]
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_boxes))
    return 5 * cost_bbox + cost_class + 2 * cost_giou


def official(logits, boxes, labels, tboxes, valid):
    sizes = valid.sum(1)
    tgt_ids, tgt_boxes = jnp.asarray(labels[valid]), jnp.asarray(tboxes[valid])
    out = []
    for layer in range(L):
        c = np.asarray(official_cost(logits[layer], boxes[layer], tgt_ids, tgt_boxes)).reshape(len(sizes), N, -1)
        splits = np.split(c, np.cumsum(sizes)[:-1], axis=-1)
        out.append([linear_sum_assignment(s[i]) for i, s in enumerate(splits)])
    return out


def batched(solver):
    @jax.jit
    def run(logits, boxes, labels, tboxes, valid):
        cost = matching.cost_matrix(logits, boxes, labels, tboxes, 1.0, 5.0, 2.0)  # [L, B, N, M]
        return matching.match(cost, valid, solver)  # [L, B, M]
    return lambda *a: jax.block_until_ready(run(*a))


def timeit(fn, args, repeats):
    fn(*args)  # compile / warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--batches", default="2,8,32")
    args = p.parse_args()
    figures = {}
    solvers = {"official": official, "hungarian": batched("hungarian"), "hungarian_jax": batched("hungarian_jax"),
               "sinkhorn": batched("sinkhorn")}
    for b in (int(x) for x in args.batches.split(",")):
        data = make(b)
        row = {name: round(timeit(fn, data, args.repeats) * 1e3, 2) for name, fn in solvers.items()}
        ratios = {f"speedup_{k}": round(row["official"] / row[k], 2) for k in solvers if k != "official"}
        print(f"B={b:3d}  " + "  ".join(f"{k} {v:.1f} ms" for k, v in row.items()) + "  |  speed-up vs official: "
              + "  ".join(f"{k[8:]} {v}x" for k, v in ratios.items()), flush=True)
        figures[f"B{b}"] = {**{f"{k}_ms": v for k, v in row.items()}, **ratios}
    record.finish(figures)


if __name__ == "__main__":
    main()
