"""Dynamic batching: rows submitted by concurrent requests run together on one worker thread.

A batch holds rows of one kind (the function they need), at most `max_batch` of them, and is
formed as soon as it is full or `max_wait_s` after its oldest row arrived. Each row's result
goes back to the future it was submitted with; a failing batch fails only its own rows. The
queue is bounded (`QueueFull`), and `stop()` lets the rows already queued finish first.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable, Sequence

from encoder_jax import errors

RunBatch = Callable[[str, Sequence[Any]], Sequence[Any]]  # (kind, rows) -> one result per row


class QueueFull(RuntimeError):
    """The queue holds too many rows to take a request's rows now."""


@dataclasses.dataclass
class _Pending:
    kind: str
    row: Any
    future: concurrent.futures.Future
    enqueued: float


class DynamicBatcher:
    """Collects rows into batches and runs `run_batch(kind, rows)` on a background thread.

    `on_batch(kind, rows, seconds)` (optional) is called after each batch, e.g. for metrics.
    """

    def __init__(self, run_batch: RunBatch, *, max_batch: int, max_wait_s: float, max_queue: int,
                 on_batch: Callable[[str, Sequence[Any], float], None] | None = None):
        if max_batch < 1 or max_queue < max_batch or max_wait_s < 0:
            raise errors.ConfigError(f"max_batch={max_batch} must be >= 1, max_queue={max_queue} >= "
                                     f"max_batch, max_wait_s={max_wait_s} >= 0")
        self.run_batch, self.on_batch = run_batch, on_batch
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="batcher", daemon=True)

    def start(self) -> "DynamicBatcher":
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Rows waiting (not yet in a running batch)."""
        return len(self._queue)

    def submit(self, kind: str, rows: Sequence[Any]) -> list[concurrent.futures.Future]:
        """Queues rows (all or none); one future per row."""
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) + len(rows) > self.max_queue:
                raise QueueFull(f"queue full ({len(self._queue)} rows waiting, limit "
                                f"{self.max_queue}); retry later")
            pending = [_Pending(kind, row, concurrent.futures.Future(), now) for row in rows]
            self._queue.extend(pending)
            self._cond.notify()
        return [p.future for p in pending]

    async def run(self, kind: str, rows: Sequence[Any]) -> list[Any]:
        """Awaitable `submit`: the rows' results, in order."""
        futures = self.submit(kind, rows)
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))

    def stop(self, timeout: float | None = None) -> None:
        """Refuses new rows, finishes the queued ones, and ends the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _rows_of(self, kind: str) -> int:
        return sum(1 for p in self._queue if p.kind == kind)

    def _next_batch(self) -> list[_Pending] | None:
        """Blocks until a batch is due; takes it off the queue (None: stopped and drained)."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
            head = self._queue[0]
            deadline = head.enqueued + self.max_wait_s
            while not self._stopping and self._rows_of(head.kind) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, rest = [], collections.deque()
            for p in self._queue:
                (batch if p.kind == head.kind and len(batch) < self.max_batch else rest).append(p)
            self._queue = rest
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.monotonic()
            try:
                results = self.run_batch(live[0].kind, [p.row for p in live])
            except Exception as e:  # the batch's requests get the error; the server goes on
                for p in live:
                    p.future.set_exception(e)
                continue
            for p, result in zip(live, results):
                p.future.set_result(result)
            if self.on_batch is not None:
                self.on_batch(live[0].kind, [p.row for p in live], time.monotonic() - start)
