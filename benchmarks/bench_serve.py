"""`detrax serve` under load: N concurrent clients on localhost, each posting images back to back for a while;
throughput and p50 / p95 latency with batching (requests within `--window-ms` run as one batch of at most
`--max-batch`) against one request at a time (`--max-batch 1`), the same model and images, each service in a
process of its own; and `detrax predict` on the same images (one process: its images per second, startup
included, and without it). Goal: with 8 clients, batching at least 1.5x the throughput of one at a time.

    python benchmarks/bench_serve.py [--checkpoint FILE] [--clients 8] [--seconds 30] [--images 32]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import record


def images(n: int, seed: int = 0) -> list[bytes]:
    """`n` synthetic scenes of the demo's generator, as PNG bytes."""
    from detrax.config import presets
    from detrax.data.synthetic import scene

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        scene(rng, *presets.DEMO_SHAPE)[0].save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def demo_weights(folder: str) -> str:
    """The demo's model with random weights, saved with the demo's val transform (its 128x160 scenes stay at their
    size): a weights file the services load."""
    from flax import nnx

    import detrax
    from detrax.config import presets
    from detrax.models.detr import DETR

    cfg = presets.get("demo")
    path = os.path.join(folder, "demo_random.safetensors")
    detrax.Detector(DETR(cfg.model.with_classes(), rngs=nnx.Rngs(0)), data=cfg.data).save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint: str, port: int, *flags: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "detrax.cli", "serve", checkpoint, "--port", str(port), *flags],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"detrax serve exited ({p.returncode}): {p.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            time.sleep(0.5)
    p.kill()
    raise SystemExit("detrax serve did not answer /health in 300 s")


async def load(port: int, bodies: list[bytes], clients: int, seconds: float, warm: float = 10.0) -> dict:
    """`clients` tasks posting the images in turn for `seconds`: requests per second and latencies."""
    import httpx

    latencies: list[float] = []
    statuses: dict = {}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        async def one(k: int, end: float, rounds: int | None = None):
            i, done = k, 0
            while time.perf_counter() < end and (rounds is None or done < rounds):
                t = time.perf_counter()
                r = await client.post("/detect", content=bodies[i % len(bodies)], headers={"content-type": "image/png"})
                if rounds is None:
                    latencies.append(time.perf_counter() - t)
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                i, done = i + clients, done + 1

        # untimed: every client for `warm` seconds, so that every batch size a burst makes is compiled before the clock
        await asyncio.gather(*(one(k, time.perf_counter() + warm, 10**9) for k in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(one(k, t0 + seconds) for k in range(clients)))
        wall = time.perf_counter() - t0
    q = np.percentile(latencies, [50, 95])
    return {"requests_per_s": round(len(latencies) / wall, 2), "p50_ms": round(1000 * float(q[0]), 1),
            "p95_ms": round(1000 * float(q[1]), 1), "max_ms": round(1000 * max(latencies), 1),
            "requests": len(latencies), "statuses": statuses}


def serve_run(checkpoint, bodies, clients, seconds, *flags) -> dict:
    port = free_port()
    p = start(checkpoint, port, *flags)
    try:
        return asyncio.run(load(port, bodies, clients, seconds))
    finally:
        p.terminate()
        p.wait(30)


def predict_run(checkpoint: str, bodies: list[bytes]) -> dict:
    """`detrax predict` on the same images in one process: images per second with its startup, and the time of
    the images alone (its own summary)."""
    with tempfile.TemporaryDirectory() as d:
        for i, b in enumerate(bodies):
            with open(os.path.join(d, f"{i:03d}.png"), "wb") as f:
                f.write(b)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "detrax.cli", "predict", checkpoint, d, "--out",
                        os.path.join(d, "out")], check=True, capture_output=True)
        wall = time.perf_counter() - t
    return {"images_per_s_with_startup": round(len(bodies) / wall, 2), "seconds": round(wall, 2)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="what the services load (default: the demo's model with "
                   "random weights and the demo's val transform, on the demo's 128x160 scenes)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--window-ms", type=float, default=10.0)
    args = p.parse_args()
    print(record.cpu(), flush=True)
    bodies = images(args.images)
    folder = tempfile.mkdtemp(prefix="bench_serve_")
    args.checkpoint = args.checkpoint or demo_weights(folder)
    batched = serve_run(args.checkpoint, bodies, args.clients, args.seconds, "--max-batch", str(args.max_batch),
                        "--window-ms", str(args.window_ms))
    print(f"batched ({args.max_batch} within {args.window_ms} ms): {batched}", flush=True)
    single = serve_run(args.checkpoint, bodies, args.clients, args.seconds, "--max-batch", "1", "--window-ms", "0")
    print(f"one at a time: {single}", flush=True)
    predict = predict_run(args.checkpoint, bodies)
    print(f"detrax predict: {predict}", flush=True)
    figures = {"clients": args.clients, "seconds": args.seconds, "max_batch": args.max_batch,
               "window_ms": args.window_ms, "checkpoint": os.path.basename(args.checkpoint),
               **{f"batched_{k}": v for k, v in batched.items()}, **{f"single_{k}": v for k, v in single.items()},
               **{f"predict_{k}": v for k, v in predict.items()},
               "ratio_throughput": round(batched["requests_per_s"] / single["requests_per_s"], 2),
               "ratio_p50": round(batched["p50_ms"] / single["p50_ms"], 2)}
    record.finish(figures)


if __name__ == "__main__":
    main()
