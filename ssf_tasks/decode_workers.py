"""Image decoding in worker processes, written straight into shared batch buffers.

Why: PIL releases the GIL inside its JPEG decoder and its resampler, but the Python around each image (opening the
file, the transform's steps, the array conversion) holds it, so with many threads the interpreter rather than the
cores sets the pace. Each worker process has its own interpreter. Only paths or encoded bytes travel to a worker;
the decoded pixels come back through a file mapping that the main process also maps (``/dev/shm`` where it has room),
so no pixel is pickled, and on CUDA that mapping is page-locked once so batches copy to the device asynchronously.

The workers run exactly the operations of :meth:`~ssf_tasks.image_input.InputStage.decode_into`, so their bytes
equal the in-process path's (tested).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .image_input import ImageSource, InputStage

__all__ = ["ProcessDecoder"]

_POLL_S = 0.5
"""How often the collector and the workers look whether their peer is still alive."""


@dataclass
class _Ring:
    """One file mapping of ``slots`` images of ``[H, W, 3]`` uint8, seen by every worker."""

    path: str
    file: Any
    mapping: mmap.mmap
    images: torch.Tensor  # [slots, H, W, 3], a view of ``mapping``
    pinned: bool

    @property
    def base(self) -> int:
        return self.images.data_ptr()

    def slot_of(self, out: torch.Tensor) -> int | None:
        offset = out.data_ptr() - self.base
        if 0 <= offset < self.images.numel():
            return offset // self.images[0].numel()
        return None


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    jobs: multiprocessing.connection.Connection
    results: multiprocessing.connection.Connection
    sending: threading.Lock
    pending: dict[int, Future[None]]  # job id -> its future, for the jobs this worker holds


class ProcessDecoder:
    """A pool of worker processes that decode and resize images into shared buffers.

    The interface matches :class:`~ssf_tasks.image_input.ThreadDecoder`: :meth:`buffers` hands out batch buffers,
    :meth:`submit` fills one, :meth:`decode_one` decodes a single image (for the server).
    """

    def __init__(self, processes: int, *, pin: bool = False) -> None:
        self.processes = processes
        self.pin = pin and torch.cuda.is_available()
        self._ctx = multiprocessing.get_context("spawn")
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._workers = [self._start() for _ in range(processes)]
        self._idle: dict[tuple[int, ...], list[_Ring]] = {}
        self._busy: list[_Ring] = []
        self._singles: dict[tuple[int, int], tuple[_Ring, queue.Queue[int]]] = {}
        self._closed = False
        self._collector = threading.Thread(target=self._collect, name="ssf-decode-collector", daemon=True)
        self._collector.start()

    # ------------------------------------------------------------------------------------- buffers
    def buffers(self, count: int, batch: int, hw: tuple[int, int], pin: bool = False) -> list[torch.Tensor]:
        """``count`` buffers ``uint8 [batch, H, W, 3]`` in one shared ring (give them back with :meth:`release`)."""
        key = (count, batch, *hw)
        with self._lock:
            idle = self._idle.get(key)
            ring = idle.pop() if idle else self._new_ring(count * batch, hw)
            self._busy.append(ring)
        return list(ring.images.view(count, batch, *hw, 3).unbind(0))

    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        """Return the ring of :meth:`buffers` for reuse."""
        if not buffers:
            return
        with self._lock:
            for ring in self._busy:
                if ring.slot_of(buffers[0]) is not None:
                    self._busy.remove(ring)
                    slots, *hw, _ = ring.images.shape
                    key = (len(buffers), slots // len(buffers), *hw)
                    self._idle.setdefault(key, []).append(ring)
                    return

    # ------------------------------------------------------------------------------------- decoding
    def submit(
        self, stage: InputStage, out: torch.Tensor, sources: Sequence[ImageSource], names: Sequence[str | None]
    ) -> list[Future[None]]:
        """Decode ``sources`` into ``out`` (a slice of a buffer from :meth:`buffers`), split among the workers.

        Each future raises :class:`DataError` naming the first image of its share that cannot be read.
        """
        with self._lock:
            ring = next((r for r in self._busy if r.slot_of(out) is not None), None)
        if ring is None:
            raise ValueError("out is not a buffer of this decoder")
        first = ring.slot_of(out)
        share = max(1, math.ceil(len(sources) / (2 * self.processes)))
        return [
            self._send(
                ring, stage, first + start, list(sources[start : start + share]), list(names[start : start + share])
            )
            for start in range(0, len(sources), share)
        ]

    def decode_one(self, stage: InputStage, source: ImageSource, name: str | None, hw: tuple[int, int]) -> torch.Tensor:
        """One image, decoded by a worker: ``uint8 [H, W, 3]`` (a copy, the shared slot is reused at once)."""
        with self._lock:
            if hw not in self._singles:
                slots = 4 * self.processes
                free: queue.Queue[int] = queue.Queue()
                for slot in range(slots):
                    free.put(slot)
                self._singles[hw] = (self._new_ring(slots, hw), free)
            ring, free = self._singles[hw]
        slot = free.get()
        try:
            self._send(ring, stage, slot, [source], [name]).result()
            return ring.images[slot].clone()
        finally:
            free.put(slot)

    def close(self) -> None:
        """Stop the workers and free the shared memory."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            with worker.sending, contextlib.suppress(OSError):
                worker.jobs.send(None)
        for worker in self._workers:
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.terminate()
            self._fail(worker, "the image decoder was closed")
            worker.jobs.close()
            worker.results.close()
        rings = [r for idle in self._idle.values() for r in idle] + self._busy + [r for r, _ in self._singles.values()]
        for ring in rings:
            _close_ring(ring)
        self._idle.clear()
        self._busy.clear()
        self._singles.clear()

    # ------------------------------------------------------------------------------------- internals
    def _start(self) -> _Worker:
        """A worker with pipes of its own: a worker killed mid-read holds no lock that the others need."""
        jobs_out, jobs_in = self._ctx.Pipe(duplex=False)
        results_out, results_in = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(
            target=_work, args=(jobs_out, results_in, os.getpid()), name="ssf-decode", daemon=True
        )
        process.start()
        jobs_out.close()
        results_in.close()
        return _Worker(process, jobs_in, results_out, threading.Lock(), {})

    def _new_ring(self, slots: int, hw: tuple[int, int]) -> _Ring:
        size = slots * hw[0] * hw[1] * 3
        folder = "/dev/shm" if _has_room("/dev/shm", size) else tempfile.gettempdir()
        file = tempfile.NamedTemporaryFile(prefix=f"ssf-tasks-decode-{os.getpid()}-", dir=folder)  # noqa: SIM115
        file.truncate(size)
        mapping = mmap.mmap(file.fileno(), size)
        images = torch.frombuffer(mapping, dtype=torch.uint8).view(slots, *hw, 3)
        pinned = False
        if self.pin:
            pinned = torch.cuda.cudart().cudaHostRegister(images.data_ptr(), size, 0) == 0
        return _Ring(file.name, file, mapping, images, pinned)

    def _send(
        self, ring: _Ring, stage: InputStage, first: int, sources: list[ImageSource], names: list[str | None]
    ) -> Future[None]:
        """Send one job to the worker with the least in flight."""
        if self._closed:
            raise DataError("the image decoder is closed")
        future: Future[None] = Future()
        future.set_running_or_notify_cancel()  # a job cannot be taken back from a worker: no cancel()
        job = next(self._ids)
        with self._lock:
            worker = min(self._workers, key=lambda w: len(w.pending))
            worker.pending[job] = future
        message = (job, ring.path, tuple(ring.images.shape), first, stage, list(zip(sources, names, strict=True)))
        try:
            with worker.sending:
                worker.jobs.send(message)
        except OSError:  # the worker died; the collector replaces it and fails its jobs
            pass
        return future

    def _collect(self) -> None:
        """Resolve futures as workers report; replace a worker that died, failing the jobs it held."""
        while not self._closed:
            with self._lock:
                by_connection = {w.results: w for w in self._workers}
            try:
                ready = multiprocessing.connection.wait(list(by_connection), timeout=_POLL_S)
            except OSError:  # closed while waiting
                return
            for connection in ready:
                worker = by_connection[connection]
                try:
                    job, error = connection.recv()
                except (EOFError, OSError):
                    self._replace(worker)
                    continue
                with self._lock:
                    future = worker.pending.pop(job, None)
                if future is not None and not future.done():
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(DataError(error))
            for worker in list(self._workers):
                if not worker.process.is_alive():
                    self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        if self._closed or worker not in self._workers:
            return
        worker.process.join(timeout=1)
        with self._lock:
            self._workers[self._workers.index(worker)] = self._start()
        self._fail(worker, f"an image decoder process stopped (exit code {worker.process.exitcode}); try again")
        worker.jobs.close()
        worker.results.close()

    def _fail(self, worker: _Worker, message: str) -> None:
        with self._lock:
            pending, worker.pending = worker.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DataError(message))


def _has_room(folder: str, size: int) -> bool:
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize > 2 * size


def _close_ring(ring: _Ring) -> None:
    if ring.pinned:
        torch.cuda.cudart().cudaHostUnregister(ring.images.data_ptr())
    del ring.images
    try:
        ring.mapping.close()
    except BufferError:  # a tensor view is still alive somewhere: leave the mapping to the garbage collector
        pass
    ring.file.close()


# ----------------------------------------------------------------------------------------- worker side
def _work(jobs: Any, results: Any, parent: int) -> None:
    """A worker's loop: decode each job's images into its ring, report the first error; exit with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    torch.set_num_threads(1)
    views: dict[str, tuple[Any, mmap.mmap, np.ndarray]] = {}
    while True:
        if not jobs.poll(_POLL_S):
            if os.getppid() != parent:
                return
            continue
        try:
            job = jobs.recv()
        except EOFError:  # the main process closed its end
            return
        if job is None:
            return
        job_id, path, shape, first, stage, items = job
        try:
            if path not in views:
                if len(views) >= 4:
                    old_file, old_mapping, old_array = views.pop(next(iter(views)))
                    del old_array
                    try:
                        old_mapping.close()
                    except BufferError:
                        pass
                    old_file.close()
                file = open(path, "r+b")  # noqa: SIM115 (kept open while mapped)
                mapping = mmap.mmap(file.fileno(), math.prod(shape))
                views[path] = (file, mapping, np.frombuffer(mapping, dtype=np.uint8).reshape(shape))
            array = views[path][2]
            for k, (source, name) in enumerate(items):
                image = np.asarray(stage.resize(_load(source, name)), dtype=np.uint8)
                if image.shape != shape[1:]:
                    raise DataError(f"image {name or source} is {image.shape} after the transform, not {shape[1:]}")
                array[first + k] = image
            results.send((job_id, None))
        except DataError as exc:
            results.send((job_id, str(exc)))
        except Exception as exc:  # noqa: BLE001 (reported to the caller as that image's error)
            results.send((job_id, f"cannot decode images: {type(exc).__name__}: {exc}"))


def _load(source: ImageSource, name: str | None):  # noqa: ANN202
    from .image_input import load_rgb

    return load_rgb(source, name)
