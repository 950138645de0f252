"""Cross-task dynamic batching: concurrent requests for any tasks gathered into one mixed batch.

Requests put their decoded images on one queue; one thread takes up to ``max_batch_size`` of them, waiting at most
``max_delay`` seconds after the first, whatever their tasks, and runs them as one mixed batch of the Predictor.
Since every sample gathers its own γ/β rows, a batch of 64 tasks costs what a batch of one task costs.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..engine import Predictor, Prepared

__all__ = ["Batcher", "QueueFullError", "resolve_future"]


class QueueFullError(Exception):
    """More images are waiting than the queue may hold: the caller answers 503."""


@dataclass
class _Waiting:
    items: Sequence[Prepared]
    top_k: int
    deliver: Callable[[list | BaseException], None]  # called on the batching thread with the answer or the error
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """The batching thread of one Predictor.

    Args:
        predictor: What runs the batches.
        max_batch_size: Images per forward at most.
        max_delay: Seconds a batch waits for more images after its first.
        max_queue: Images that may wait at once; beyond that :meth:`submit` raises :class:`QueueFullError`.
        on_batch: Called with each batch's size and the number of images still waiting (metrics).
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch_size: int = 64,
        max_delay: float = 0.005,
        max_queue: int = 4096,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._queue: queue.Queue[_Waiting | None] = queue.Queue()
        self._waiting_images = 0
        self._count_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ssf-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Images waiting for a batch."""
        return self._waiting_images

    async def submit(self, items: Sequence[Prepared], top_k: int) -> list:
        """Queue prepared images; returns ``Predictor.run_prepared``'s answer for them once their batch ran."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def deliver(answer: list | BaseException) -> None:
            loop.call_soon_threadsafe(resolve_future, future, answer)

        self.submit_with(items, top_k, deliver)
        return await future

    def submit_with(
        self, items: Sequence[Prepared], top_k: int, deliver: Callable[[list | BaseException], None]
    ) -> None:
        """Queue prepared images; ``deliver`` gets the answer (or the exception) on the batching thread.

        Raises:
            QueueFullError: more images would wait than ``max_queue``.
        """
        with self._count_lock:
            if self._waiting_images + len(items) > self.max_queue:
                raise QueueFullError(f"{self._waiting_images} images are waiting (at most {self.max_queue})")
            self._waiting_images += len(items)
        self._queue.put(_Waiting(items, top_k, deliver))

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        carry: _Waiting | None = None
        while True:
            first = carry or self._queue.get()
            carry = None
            if first is None:
                return
            batch, size = [first], len(first.items)
            deadline = time.perf_counter() + self.max_delay
            stop = False
            while size < self.max_batch_size:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                if size + len(more.items) > self.max_batch_size:
                    carry = more  # starts the next batch: a request's images stay together
                    break
                batch.append(more)
                size += len(more.items)
            self._run_batch(batch, size)
            if stop:
                self._queue.put(None)

    def _run_batch(self, batch: list[_Waiting], size: int) -> None:
        with self._count_lock:
            self._waiting_images -= size
        items = [item for waiting in batch for item in waiting.items]
        top_k = max(w.top_k for w in batch)
        try:
            results = self.predictor.run_prepared(items, top_k)
        except Exception as error:  # answered to every waiting request, never lost in this thread
            for waiting in batch:
                waiting.deliver(error)
            return
        if self.on_batch is not None:
            self.on_batch(size, self._waiting_images)
        start = 0
        for waiting in batch:
            part = results[start : start + len(waiting.items)]
            start += len(waiting.items)
            trimmed = [
                r if isinstance(r, str) else (r[0][: waiting.top_k], r[1][: waiting.top_k], *r[2:]) for r in part
            ]
            waiting.deliver(trimmed)


def resolve_future(future: asyncio.Future, answer: object) -> None:
    """Complete ``future`` (on its loop's thread) with ``answer``, or fail it when ``answer`` is an exception."""
    if future.done():
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)
