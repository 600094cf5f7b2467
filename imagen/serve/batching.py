"""Dynamic batching with a bounded queue: requests that can share a batch run together.

A request joins the group of its batch key (same model, sampler, steps, guidance, size ...). One worker takes the
group whose oldest request has waited longest, lets it fill up to `max_batch` rows for at most `max_wait_ms`, and
runs it on one model thread. With `queue` requests waiting, `submit` refuses at once (QueueFull -> 429); a request
not answered within `timeout_s` is dropped (Timeout -> 504) and, if it has not started, never runs.
A request may listen to the progress of the batch it runs in: `run` reports events from the model thread and each
listener of the batch gets them on the event loop.

A running batch stops at its next progress event (a sampling step) once every one of its requests has been dropped
(timed out, or its client went away): the progress call raises, and the compute ends there. While one request of a
batch still waits for its answer, the whole batch runs on, the dropped requests' rows included: every row has its
own noise, so taking rows out would change no answer, but it saves only their share of a step, and the rows of a
sampling loop are not ours to slice from here.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

from imagen.config import (DEFAULT_SERVE_MAX_BATCH, DEFAULT_SERVE_MAX_WAIT_MS, DEFAULT_SERVE_QUEUE,
                           DEFAULT_SERVE_TIMEOUT_S)


class QueueFull(Exception):
    """The queue holds `queue` waiting requests; the caller should retry later."""


class Timeout(Exception):
    """A request was not answered within timeout_s; its work was dropped."""


class _Cancelled(Exception):
    """Raised on the model thread by a batch's progress call when no request of the batch wants its answer."""


@dataclass
class BatchSettings:
    max_batch: int = DEFAULT_SERVE_MAX_BATCH  # rows (samples or images) run at once; a larger request runs alone
    max_wait_ms: float = DEFAULT_SERVE_MAX_WAIT_MS  # how long the first request of a batch waits for others
    queue: int = DEFAULT_SERVE_QUEUE  # waiting requests (not yet running) before new ones get 429
    timeout_s: float = DEFAULT_SERVE_TIMEOUT_S  # from arrival to answer


@dataclass
class _Item:
    payload: Any
    rows: int
    future: asyncio.Future
    progress: Callable[..., None] | None = None  # called on the event loop with the batch's progress events
    arrived: float = field(default_factory=time.monotonic)
    dropped: bool = False  # timed out or its client went away; read by the model thread between steps


# run(key, payloads, progress) -> one result per payload; it runs on the model thread, never on the event loop,
# and may call progress(*event) (thread-safe) as the batch advances.
RunFn = Callable[[Hashable, Sequence[Any], Callable[..., None]], Sequence[Any]]


class Batcher:
    """Groups submitted payloads by key and runs each group through `run` in batches (see the module docstring)."""

    def __init__(self, run: RunFn, settings: BatchSettings, on_batch: Callable[[Hashable, int], None] | None = None,
                 on_cancel: Callable[[Hashable], None] | None = None):
        self.run = run
        self.settings = settings
        self.on_batch = on_batch  # called with (key, rows) for each batch run: metrics
        self.on_cancel = on_cancel  # called with the key of each batch stopped before its end: metrics
        self.groups: dict[Hashable, list[_Item]] = {}
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="imagen-model")
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self.running = 0  # requests in the batch being run

    @property
    def waiting(self) -> int:
        """Requests queued and not yet running (the queue depth)."""
        return sum(len(items) for items in self.groups.values())

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._worker = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish nothing new: cancel the worker (the batch running on the model thread completes) and refuse the rest."""
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        for items in self.groups.values():
            for item in items:
                if not item.future.done():
                    item.future.set_exception(QueueFull())
        self.groups.clear()
        self.executor.shutdown(wait=True)

    async def submit(self, key: Hashable, payload: Any, rows: int = 1, progress: Callable[..., None] | None = None) -> Any:
        """The result of `payload` once its batch has run; QueueFull or Timeout otherwise. `progress(*event)` gets,
        on the event loop, every progress event of the batch the request runs in."""
        if self._worker is None:
            self.start()
        if self.waiting >= self.settings.queue:
            raise QueueFull()
        item = _Item(payload, rows, asyncio.get_running_loop().create_future(), progress)
        self.groups.setdefault(key, []).append(item)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(item.future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            self._drop(key, item)  # a queued item is skipped; a running one's batch may stop (module docstring)
            raise Timeout() from None
        except asyncio.CancelledError:  # the client went away: drop the work as for a timeout
            self._drop(key, item)
            raise

    def _drop(self, key, item) -> None:
        item.dropped = True
        item.future.cancel()
        self._discard(key, item)

    def _discard(self, key, item) -> None:
        items = self.groups.get(key)
        if items and item in items:
            items.remove(item)
            if not items:
                del self.groups[key]

    def _take(self, key) -> list[_Item]:
        """Up to max_batch rows of a group, oldest first (always at least one request)."""
        items, batch, rows = self.groups[key], [], 0
        while items and (not batch or rows + items[0].rows <= self.settings.max_batch):
            item = items.pop(0)
            batch.append(item)
            rows += item.rows
        if not items:
            del self.groups[key]
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.groups:
                self._wake.clear()
                await self._wake.wait()
                continue
            key = min(self.groups, key=lambda k: self.groups[k][0].arrived)
            deadline = self.groups[key][0].arrived + self.settings.max_wait_ms / 1000
            while (key in self.groups and sum(i.rows for i in self.groups[key]) < self.settings.max_batch
                   and time.monotonic() < deadline):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
            if key not in self.groups:  # every request of the group timed out while it waited
                continue
            batch = [item for item in self._take(key) if not item.future.done()]
            if not batch:
                continue
            self.running = len(batch)
            if self.on_batch is not None:
                self.on_batch(key, sum(i.rows for i in batch))
            listeners = [i.progress for i in batch if i.progress is not None]

            def progress(*event, listeners=listeners, batch=batch):  # on the model thread
                if all(item.dropped for item in batch):
                    raise _Cancelled()
                for listener in listeners:
                    loop.call_soon_threadsafe(listener, *event)

            try:
                results = await loop.run_in_executor(self.executor, self.run, key, [i.payload for i in batch], progress)
            except _Cancelled:  # nobody is waiting for this batch: its requests have had their 504 or gone
                if self.on_cancel is not None:
                    self.on_cancel(key)
            except Exception as exc:  # one bad batch answers its own requests with the error, the server goes on
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            else:
                for item, result in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(result)
            finally:
                self.running = 0
