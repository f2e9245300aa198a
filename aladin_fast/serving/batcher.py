"""Dynamic batching: merge concurrent requests into one fused call on a worker thread.

::

    batcher = DynamicBatcher("search", run_search_batch, key=search_batch_key,
                             max_batch_size=32, max_wait_ms=2.0, executor=pool, metrics=registry)
    batcher.start()                       # inside a running event loop
    result = await batcher.submit(query)  # from many concurrent handlers
    await batcher.close()                 # drains what is queued, then stops

Policy. Waiting items form one FIFO. A batch starts with the oldest item and
takes, in arrival order, every waiting item with the same ``key(item)`` (the
compatibility key: same gallery snapshot, direction, ``rerank_k``...) until
it holds ``max_batch_size`` items or the oldest item has waited
``max_wait_ms``; items with other keys stay queued for the next batch. While
all ``workers`` are busy no batch is formed, so under load batches fill from
the backlog without any extra wait, and at low load a lone request waits at
most ``max_wait_ms``. ``max_batch_size=1`` turns batching off: each item is
its own call, immediately.

Isolation. ``run_batch(items)`` must return one result per item, in order;
item i's future gets exactly result i. When a batch call raises, every item is
re-run alone, so one poisoned request fails only itself (its own exception,
which the HTTP layer turns into a 5xx) and never its batch neighbours.

Shutdown. :meth:`close` refuses new items and lets queued and running ones
finish (up to a timeout); :meth:`refuse_unanswered` answers every item not
answered yet -- queued, forming or running -- with :class:`BatcherClosedError`
at once (a running call goes on in its worker thread; its results are
dropped). A batch whose items are all answered already is not run.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from .metrics import MetricsRegistry

__all__ = ["DynamicBatcher", "QueueFullError", "BatcherClosedError"]


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` items already (HTTP 503, retry later)."""


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no new items (HTTP 503)."""


class _Item:
    __slots__ = ("payload", "key", "future", "enqueued_at")

    def __init__(self, payload, key, future, enqueued_at):
        self.payload = payload
        self.key = key
        self.future = future
        self.enqueued_at = enqueued_at


class DynamicBatcher:
    """Collect concurrent items and run compatible ones in one ``run_batch`` call.

    Args:
        name: queue label in the metrics (``"search"``, ``"rerank"``).
        run_batch: ``items -> results`` (same length and order), run on ``executor``.
        key: compatibility key; only items with equal keys share a call.
        max_batch_size: items per call (1 disables batching).
        max_wait_ms: longest wait of the oldest item for the batch to fill.
        workers: calls in flight at once.
        max_queue: waiting items before :meth:`submit` raises :class:`QueueFullError`.
        executor: where ``run_batch`` runs (default: the loop's default executor).
        metrics: registry for batch size / latency / queue depth (optional).
    """

    def __init__(self, name: str, run_batch: Callable[[Sequence[Any]], List[Any]], *,
                 key: Callable[[Any], Any] = lambda item: None, max_batch_size: int = 32, max_wait_ms: float = 2.0,
                 workers: int = 1, max_queue: int = 1024, executor: Optional[Executor] = None,
                 metrics: Optional[MetricsRegistry] = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if not max_wait_ms >= 0:  # NaN too
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.name = name
        self.run_batch = run_batch
        self.key = key
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_ms) / 1000.0
        self.workers = int(workers)
        self.max_queue = int(max_queue)
        self.executor = executor
        self.metrics = metrics
        self._items: Deque[_Item] = collections.deque()
        self._forming: List[_Item] = []  # taken off the queue by the collector, not yet handed to _run
        self._arrived: Optional[asyncio.Event] = None
        self._slots: Optional[asyncio.Semaphore] = None
        self._runner: Optional[asyncio.Task] = None
        self._running: Dict[asyncio.Task, List[_Item]] = {}  # each running call's task -> its batch
        self._closing = False
        self.batches_run = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._runner is not None:
            raise RuntimeError(f"batcher {self.name!r} is already started")
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(self.workers)
        self._runner = asyncio.get_running_loop().create_task(self._collect_forever(), name=f"batcher-{self.name}")

    async def close(self, timeout: Optional[float] = None) -> None:
        """Refuse new items, finish every queued and running one (at most ``timeout`` s: then the items
        not started yet get :class:`BatcherClosedError`; a running call still delivers), then stop the
        collector. A call whose items are all answered already (refused) is not waited for."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._unanswered():
            if deadline is not None and time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        if self._runner is not None:
            # asyncio.wait_for (Python < 3.12) swallows a cancel that arrives as its wait completes; the
            # collector then waits for items forever: cancel until it has really stopped
            while not self._runner.done():
                self._runner.cancel()
                await asyncio.wait([self._runner], timeout=0.05)
        for item in [*self._forming, *self._items]:  # only left when the timeout expired
            if not item.future.done():
                item.future.set_exception(BatcherClosedError(f"{self.name} queue closed during shutdown"))
        self._forming = []
        self._items.clear()
        self._report_depth()

    def refuse_unanswered(self, reason: str) -> int:
        """Refuse new items and fail every item not answered yet -- queued, being formed into a batch or in
        a running call -- with ``BatcherClosedError(reason)`` now; returns how many. A running call goes
        on in its worker thread (it cannot be interrupted) and its results are dropped."""
        self._closing = True
        if self._arrived is not None:
            self._arrived.set()
        refused = 0
        for item in self._held():
            if not item.future.done():
                item.future.set_exception(BatcherClosedError(reason))
                refused += 1
        self._items.clear()
        self._report_depth()
        return refused

    def _unanswered(self) -> bool:
        """Some item waits for its result: queued, in a batch being formed, or in a running call."""
        return any(not item.future.done() for item in self._held())

    def _held(self) -> List[_Item]:
        """Every item the batcher holds: being formed into a batch, queued, or in a running call."""
        return [*self._forming, *self._items, *(item for batch in self._running.values() for item in batch)]

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._items)

    # ---------------------------------------------------------------- submit
    async def submit(self, payload: Any) -> Any:
        """Queue ``payload`` and wait for its own result (or its own exception)."""
        if self._closing:
            raise BatcherClosedError(f"{self.name} queue is shutting down")
        if self._runner is None:
            raise RuntimeError(f"batcher {self.name!r} is not started (call start() in the event loop)")
        if len(self._items) >= self.max_queue:
            raise QueueFullError(f"{self.name} queue is full ({self.max_queue} waiting requests)")
        future = asyncio.get_running_loop().create_future()
        self._items.append(_Item(payload, self.key(payload), future, time.monotonic()))
        self._report_depth()
        self._arrived.set()
        return await future

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._items), queue=self.name)

    # --------------------------------------------------------------- collect
    def _take_matching(self, key, batch: List[_Item]) -> None:
        """Move waiting items with ``key`` into ``batch`` (arrival order) while there is room."""
        if len(batch) >= self.max_batch_size or not self._items:
            return
        kept: Deque[_Item] = collections.deque()
        while self._items:
            item = self._items.popleft()
            if len(batch) < self.max_batch_size and item.key == key:
                batch.append(item)
            else:
                kept.append(item)
        self._items = kept

    async def _next_batch(self) -> List[_Item]:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()
        first = self._items.popleft()
        batch = self._forming = [first]
        deadline = first.enqueued_at + self.max_wait_s
        while True:
            self._take_matching(first.key, batch)
            remaining = deadline - time.monotonic()
            if len(batch) >= self.max_batch_size or remaining <= 0 or self._closing:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                self._take_matching(first.key, batch)
                break
        self._forming = []  # the caller hands the batch to a _run task in this same step
        self._report_depth()
        return batch

    async def _collect_forever(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running[task] = batch
            task.add_done_callback(self._forget)
            # hold nothing while waiting for the next batch: a done batch's payloads pin their gallery generation
            del batch, task

    def _forget(self, task: asyncio.Task) -> None:
        self._running.pop(task, None)

    async def _run(self, batch: List[_Item]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            batch = [item for item in batch if not item.future.done()]  # refused (or cancelled) meanwhile
            if not batch:
                return
            payloads = [item.payload for item in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, payloads)
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
                outcomes = [(result, None) for result in results]
            except Exception as err:  # noqa: BLE001 - isolate the failing request(s)
                if len(batch) == 1:
                    outcomes = [(None, err)]
                else:
                    outcomes = [await self._run_alone(loop, payload) for payload in payloads]
            self.batches_run += 1
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(batch), queue=self.name)
                self.metrics.batch_latency.observe(time.perf_counter() - started, queue=self.name)
            for item, (result, error) in zip(batch, outcomes):
                if item.future.done():  # the client went away
                    continue
                if error is None:
                    item.future.set_result(result)
                else:
                    item.future.set_exception(error)
        finally:
            self._slots.release()

    async def _run_alone(self, loop, payload):
        try:
            return (await loop.run_in_executor(self.executor, self.run_batch, [payload]))[0], None
        except Exception as err:  # noqa: BLE001 - handed to that request only
            return None, err
