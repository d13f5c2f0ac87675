"""Bipartite matching of predictions to targets: the official cost, and its solvers, one index format.

Every matcher takes a cost [..., N, M] (N queries, M target slots) and `valid` [..., M] and returns
`query_for_target` [..., M] int32: the query matched to each valid target, -1 for padded targets. Padded
targets never match. Matching is not differentiated: the cost goes through `stop_gradient`.

- `hungarian`: exact, scipy's `linear_sum_assignment` on the host, every decoder layer and image in ONE
  `jax.pure_callback`, so a batch's matching costs one device-host round trip.
- `hungarian_jax`: exact, on device, jit- and vmap-able (shortest augmenting paths, as scipy's solver).
- `sinkhorn`: entropic optimal transport with epsilon annealing, rounded greedily to a one-to-one matching;
  `sinkhorn_ott`, the same with MasterSkepticista/detr's settings (ott-jax's epsilon schedule, raw cost).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from detrax.config import checks
from detrax.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou


def cost_matrix(logits, boxes, tgt_labels, tgt_boxes, class_weight: float, bbox_weight: float, giou_weight: float):
    """The official HungarianMatcher cost. logits [..., N, C+1], boxes [..., N, 4], tgt_labels [..., M],
    tgt_boxes [..., M, 4] (cx, cy, w, h) -> [..., N, M]. Leading dims broadcast (e.g. layers L and batch B)."""
    prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [..., N, C+1]
    labels = jnp.broadcast_to(tgt_labels[..., None, :], prob.shape[:-1] + tgt_labels.shape[-1:])  # [..., N, M]
    cost_class = -jnp.take_along_axis(prob, labels, axis=-1)  # [..., N, M]
    cost_bbox = jnp.abs(boxes[..., :, None, :] - tgt_boxes[..., None, :, :]).sum(-1)  # [..., N, M]
    pairwise_giou = generalized_box_iou
    for _ in range(boxes.ndim - 2):
        pairwise_giou = jax.vmap(pairwise_giou)
    tgt = jnp.broadcast_to(tgt_boxes, boxes.shape[:-2] + tgt_boxes.shape[-2:])
    cost_giou = -pairwise_giou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt))  # [..., N, M]
    cost = bbox_weight * cost_bbox + class_weight * cost_class + giou_weight * cost_giou
    return jnp.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)  # a bad box matches last, never crashes


# ----------------------------------------------------------------------------------- hungarian (host)

def solve_host(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """cost [..., N, M], valid [..., M] -> [..., M] int32, with scipy, one call per matrix."""
    from scipy.optimize import linear_sum_assignment

    cost, valid = np.asarray(cost, np.float64), np.asarray(valid, bool)
    valid = np.broadcast_to(valid, cost.shape[:-2] + cost.shape[-1:])
    out = np.full(cost.shape[:-2] + cost.shape[-1:], -1, np.int32)
    for idx in np.ndindex(*cost.shape[:-2]):
        cols = np.flatnonzero(valid[idx])
        if cols.size:
            rows, picked = linear_sum_assignment(cost[idx][:, cols])
            out[idx + (cols[picked],)] = rows
    return out


# JAX hands a callback its operands through a host transfer, and XLA:CPU makes a transfer of 100 KiB or more
# asynchronously, on the thread pool that runs the calling program: in a process with one CPU (a pool of one
# thread) the callback then waits on itself forever. Operands go in pieces of at most this many bytes.
_PIECE_BYTES = 64 * 1024


def _pieces(x):
    """x -> flat pieces of at most _PIECE_BYTES each."""
    flat, step = x.reshape(-1), _PIECE_BYTES // x.dtype.itemsize
    return [flat[i:i + step] for i in range(0, flat.size, step)] or [flat]


def _solve_pieces(count, cost_shape):
    def solve(*pieces):
        cost = np.concatenate([np.asarray(p) for p in pieces[:count]]).reshape(cost_shape)
        valid = np.concatenate([np.asarray(p) for p in pieces[count:]]).reshape(cost_shape[:-2] + cost_shape[-1:])
        return solve_host(cost, valid)
    return solve


def hungarian(cost, valid):
    """Exact matching of every matrix in `cost` [..., N, M] in one host call."""
    cost = jax.lax.stop_gradient(cost)
    valid = jnp.broadcast_to(valid, cost.shape[:-2] + cost.shape[-1:])
    shape = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
    cost_pieces = _pieces(cost)
    return jax.pure_callback(_solve_pieces(len(cost_pieces), cost.shape), shape, *cost_pieces, *_pieces(valid),
                             vmap_method="sequential")


# ------------------------------------------------------------------------------- hungarian (device)

def _solve_one(cost, valid):
    """cost [N, M], valid [M] -> [M]: rows are the targets (R = M), columns the queries (K = N), R <= K."""
    c = jnp.where(jnp.isfinite(cost), cost, 1e8).T.astype(jnp.float32)  # [R, K]
    big = jnp.asarray(jnp.inf, c.dtype)
    num_rows, num_cols = c.shape
    order = jnp.argsort(~valid, stable=True)  # valid targets first

    def augment(state):
        k, u, v, col4row, row4col = state
        r = order[k]

        def search_cond(s):
            return s[-1] < 0

        def search(s):
            i, min_val, remaining, sr, spc, path, _ = s
            sr = sr.at[i].set(True)
            reduced = min_val + c[i] - u[i] - v  # [K]
            better = remaining & (reduced < spc)
            path = jnp.where(better, i, path)
            spc = jnp.where(better, reduced, spc)
            masked = jnp.where(remaining, spc, big)
            lowest = masked.min()
            cand = remaining & (masked == lowest)
            free = cand & (row4col < 0)
            j = jnp.where(free.any(), jnp.argmax(free), jnp.argmax(cand))
            remaining = remaining.at[j].set(False)
            sink = jnp.where(row4col[j] < 0, j, -1)
            return row4col[j], lowest, remaining, sr, spc, path, sink

        init = (r, jnp.zeros((), c.dtype), jnp.ones(num_cols, bool),
                jnp.zeros(num_rows, bool), jnp.full(num_cols, big), jnp.full(num_cols, -1), jnp.array(-1))
        _, min_val, remaining, sr, spc, path, sink = jax.lax.while_loop(search_cond, search, init)
        sc = ~remaining
        others = sr & (jnp.arange(num_rows) != r)
        u = u + jnp.where(others, min_val - spc[jnp.clip(col4row, 0)], 0).at[r].add(min_val)
        v = v - jnp.where(sc, min_val - spc, 0)

        def walk(s):
            j, col4row, row4col, _ = s
            i = path[j]
            row4col = row4col.at[j].set(i)
            nxt = col4row[i]
            col4row = col4row.at[i].set(j)
            return nxt, col4row, row4col, i == r

        _, col4row, row4col, _ = jax.lax.while_loop(lambda s: ~s[-1], walk, (sink, col4row, row4col, False))
        return k + 1, u, v, col4row, row4col

    state = (0, jnp.zeros(num_rows, c.dtype), jnp.zeros(num_cols, c.dtype), jnp.full(num_rows, -1),
             jnp.full(num_cols, -1))
    n_valid = valid.sum()
    *_, col4row, _ = jax.lax.while_loop(lambda s: s[0] < n_valid, augment, state)
    return jnp.where(valid, col4row, -1).astype(jnp.int32)


def hungarian_jax(cost, valid):
    """Exact matching on device; any leading dims are vmapped."""
    cost = jax.lax.stop_gradient(cost)
    valid = jnp.broadcast_to(valid, cost.shape[:-2] + cost.shape[-1:])
    fn = _solve_one
    for _ in range(cost.ndim - 2):
        fn = jax.vmap(fn)
    return fn(cost, valid)


# --------------------------------------------------------------------------------------- sinkhorn

def _sinkhorn_one(cost, valid, eps_at, max_iters: int, threshold: float, normalise: bool):
    n, m = cost.shape
    finite = jnp.isfinite(cost) & valid[None, :]
    lo = jnp.where(finite, cost, jnp.inf).min()
    hi = jnp.where(finite, cost, -jnp.inf).max()
    c = jnp.where(finite, cost, hi) - lo  # [N, M], least 0 (a shift leaves the plan as it is)
    if normalise:
        c = c / jnp.maximum(hi - lo, 1e-9)  # in [0, 1]: epsilon relative to the cost's range
    c = jnp.concatenate([c, jnp.zeros((n, 1), c.dtype)], axis=1)  # a no-object column takes the rest
    n_valid = valid.sum()
    log_a = jnp.full(n, -jnp.log(n), c.dtype)  # queries: mass 1/N each
    b = jnp.concatenate([valid.astype(c.dtype), (n - n_valid)[None].astype(c.dtype)]) / n  # [M + 1]
    log_b = jnp.where(b > 0, jnp.log(jnp.where(b > 0, b, 1)), -jnp.inf)

    def step(s):
        t, f, g, _ = s
        eps = eps_at(t)
        lse = jax.nn.logsumexp((g[None, :] - c) / eps, axis=1)  # [N]
        err = jnp.abs(jnp.exp(f / eps + lse) - jnp.exp(log_a)).sum()  # the queries' marginal, before this step
        f = eps * log_a - eps * lse
        g = eps * log_b - eps * jax.nn.logsumexp((f[:, None] - c) / eps, axis=0)
        return t + 1, f, jnp.where(jnp.isfinite(g), g, -1e9), err

    go = lambda s: (s[0] < max_iters) & (s[3] > threshold)
    init = (jnp.int32(0), jnp.zeros(n, c.dtype), jnp.zeros(m + 1, c.dtype), jnp.asarray(jnp.inf, c.dtype))
    _, f, g, _ = jax.lax.while_loop(go, step, init)
    plan = jnp.where(valid[None, :], f[:, None] + g[None, :m] - c[:, :m], -jnp.inf)  # log-plan x eps [N, M]

    def pick(_, s):  # greedy rounding: the largest remaining entry, then strike its row and column
        plan, out = s
        flat = jnp.argmax(plan)
        q, t = flat // m, flat % m
        ok = plan[q, t] > -jnp.inf
        out = jnp.where(ok, out.at[t].set(q), out)
        plan = jnp.where(ok, plan.at[q, :].set(-jnp.inf).at[:, t].set(-jnp.inf), plan)
        return plan, out

    _, out = jax.lax.fori_loop(0, m, pick, (plan, jnp.full(m, -1, jnp.int32)))
    return jnp.where(valid, out, -1).astype(jnp.int32)


def _solve_sinkhorn(cost, valid, eps_at, max_iters, threshold, normalise):
    cost = jax.lax.stop_gradient(cost)
    valid = jnp.broadcast_to(valid, cost.shape[:-2] + cost.shape[-1:])
    fn = lambda c, v: _sinkhorn_one(c, v, eps_at, max_iters, threshold, normalise)
    for _ in range(cost.ndim - 2):
        fn = jax.vmap(fn)
    return fn(cost, valid)


def sinkhorn(cost, valid, eps_start=1.0, eps_end=1e-3, stages=6, iters=10):
    """Approximate matching by entropic optimal transport on the cost scaled to [0, 1]: `stages` values of
    epsilon from `eps_start` to `eps_end` (geometric), `iters` iterations each; any leading dims are vmapped."""
    ratio = eps_end / eps_start

    def eps_at(t):
        return eps_start * ratio ** (jnp.minimum(t // iters, stages - 1) / max(stages - 1, 1))

    return _solve_sinkhorn(cost, valid, eps_at, stages * iters, -1.0, normalise=True)


def sinkhorn_ott(cost, valid, epsilon=1e-3, init=50.0, decay=0.9, max_iters=1000, threshold=1e-2):
    """The Sinkhorn settings of MasterSkepticista/detr (its `configs/sinkhorn.py`, through ott-jax): epsilon
    `epsilon * max(init * decay**t, 1)` at iteration t on the cost as it is (not rescaled), until the queries'
    marginal is within `threshold` (L1) or `max_iters`. That project also turns on ott's momentum after 100
    iterations (an acceleration: the same fixed point) and rounds by sampling 100 permutations from the plan;
    here the plan is rounded greedily, as `sinkhorn`'s."""
    eps_at = lambda t: epsilon * jnp.maximum(init * decay ** t.astype(jnp.float32), 1.0)
    return _solve_sinkhorn(cost, valid, eps_at, max_iters, threshold, normalise=False)


# The matchers by name: what `LossConfig.matcher` names. A new one is a function (cost [..., N, M], valid [..., M])
# -> query_for_target [..., M] int32 (as above) and one `register_matcher` call.
MATCHERS = {"hungarian": hungarian, "hungarian_jax": hungarian_jax, "sinkhorn": sinkhorn, "sinkhorn_ott": sinkhorn_ott}


checks.register("LossConfig", lambda cfg: checks.choice("matcher", cfg.matcher, MATCHERS))


def register_matcher(name: str, fn) -> None:
    """Make `fn` available as `loss.matcher=name` (configs validate against this registry)."""
    MATCHERS[name] = fn


def match(cost, valid, matcher: str = "hungarian", mesh=None):
    """Dispatch by name (`MATCHERS`). With a `mesh` whose 'data' axis shards the batch (cost [L, B, N, M],
    valid [B, M]), each device matches its own images: host callbacks stay local."""
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHERS)}")
    fn = MATCHERS[matcher]
    if mesh is not None and mesh.size > 1:
        from jax.sharding import PartitionSpec as P

        # per image, no collectives: the solvers' loop carries need no varying-axis bookkeeping
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(None, "data"), P("data")), out_specs=P(None, "data"),
                           check_vma=False)
    return fn(cost, valid)
