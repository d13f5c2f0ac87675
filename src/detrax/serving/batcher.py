"""Requests gathered into batches for a service (`service.py`): a burst of concurrent requests runs as a few
batched calls of the model instead of one call each.

A request waits at most `window` seconds for others to join it; a batch holds at most `max_batch` of them, of one
kind (`key`: the task), and runs in one worker thread, so that the event loop goes on accepting requests while
the model runs. Within a batch the images go through the one inference path, which pads each image to its own
shape bucket and runs each bucket as one call (`infer.batches`). At most `queue` requests wait; one more is
refused at once (`Busy`: the service answers 503), so a flood cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Hashable
from typing import Any


class Busy(Exception):
    """The queue is full."""


class Batcher:
    """`await batcher.submit(item)` -> `run([items of one key])[its index]`. Start with `start()` inside the
    running event loop, stop with `close()`."""

    def __init__(self, run: Callable[[Hashable, list], list], key: Callable[[Any], Hashable] = lambda _: None,
                 max_batch: int = 8, window: float = 0.01, queue: int = 64):
        if max_batch < 1 or window < 0 or queue < 1:
            raise ValueError(f"max_batch ({max_batch}) and queue ({queue}) must be at least 1, window ({window}) at "
                             "least 0")
        self.run, self.key, self.max_batch, self.window, self.size = run, key, max_batch, window, queue
        self.batches = 0  # batches run (for /health and the load test)
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="detrax-batch")

    def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.size)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item) -> Any:
        if self._queue is None:
            raise RuntimeError("Batcher.start() first, inside the event loop")
        done = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, done))
        except asyncio.QueueFull:
            raise Busy(f"{self.size} requests are waiting already") from None
        return await done

    async def _loop(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0 and self._queue.empty():
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), max(left, 0)) if left > 0
                                 else self._queue.get_nowait())
                except (TimeoutError, asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            kinds: dict = {}
            for item, done in batch:
                kinds.setdefault(self.key(item), []).append((item, done))
            for kind, group in kinds.items():
                try:
                    results = await loop.run_in_executor(self._pool, self.run, kind, [item for item, _ in group])
                    self.batches += 1
                except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                    results = [e] * len(group)
                for (_, done), result in zip(group, results):
                    if done.cancelled():
                        continue
                    if isinstance(result, Exception):
                        done.set_exception(result)
                    else:
                        done.set_result(result)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)
