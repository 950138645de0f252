"""Several HTTP worker processes in front of one engine process.

One Python process answers a few hundred HTTP requests a second at most: parsing, JSON and the event loop share one
core (and one GIL) with decoding and batching. With ``--http-workers N`` the process that owns the GPU (the
Predictor, its batching thread, the registry poll) starts N worker processes. They accept connections on one shared
listening socket, parse requests and decode images, each on its own core, and send the decoded pixels to the engine
over a pipe; the engine batches the images of every worker and every task together and sends the answers back.
Each worker holds a copy of the :class:`~ssf_tasks.engine.TaskCatalog` (tasks, classes, input stages) that the
engine sends after every change, so a task registered while serving reaches every worker. A worker that dies is
replaced; SIGTERM lets every worker finish its requests in flight before the engine stops.

Messages on a worker's pipe (pickled; the images as raw bytes, one message each, after their header):
    engine -> worker: ``("catalog", TaskCatalog)``, ``("answer", id, results)``, ``("error", id, status, message)``
    worker -> engine: ``("infer", id, top_k, [(task, group, (H, W)), ...])``
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch

from ..config import TaskRecord
from ..engine import Predictor, Prepared, TaskCatalog
from ..errors import SSFTasksError, TaskNotFoundError
from .app import Metrics, RequestRejected, ServeConfig, create_app
from .batcher import Batcher, QueueFullError, resolve_future

__all__ = ["EngineLink", "serve_with_workers"]

_SPAWN = multiprocessing.get_context("spawn")


# ----------------------------------------------------------------------------------------------- engine side
@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message: tuple) -> None:
        """Send one message; a worker that died meanwhile is replaced by the supervisor, not an error here."""
        try:
            with self.lock:
                self.conn.send(message)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            pass


class _EngineHost:
    """The engine process's side: the batcher fed by every worker's pipe, the registry poll, the workers' lives."""

    def __init__(self, predictor: Predictor, config: ServeConfig, sock: socket.socket, workers: int, threads: int):
        self.predictor = predictor
        self.config = config
        self.sock = sock
        self.threads = threads
        self.metrics = Metrics()
        self.batcher = Batcher(
            predictor,
            max_batch_size=config.max_batch_size,
            max_delay=config.max_delay_ms / 1000,
            max_queue=config.max_queue,
            on_batch=self.metrics.observe_batch,
        )
        self.metrics.tasks.set(len(predictor.task_names))
        self.stopping = threading.Event()
        self.workers = [self._spawn() for _ in range(workers)]
        threading.Thread(target=self._poll, name="ssf-registry-poll", daemon=True).start()

    def _spawn(self) -> _Worker:
        mine, theirs = _SPAWN.Pipe(duplex=True)
        process = _SPAWN.Process(
            target=_worker_main, args=(theirs, self.sock, self.config, self.threads), name="ssf-http", daemon=False
        )
        process.start()
        theirs.close()
        worker = _Worker(process, mine)
        worker.send(("catalog", self.predictor.catalog()))
        threading.Thread(target=self._receive, args=(worker,), name="ssf-link", daemon=True).start()
        return worker

    def _receive(self, worker: _Worker) -> None:
        conn = worker.conn
        while True:
            try:
                _, request, top_k, heads = conn.recv()
                items = []
                for task, group, (h, w) in heads:
                    pixels = bytearray(h * w * 3)
                    conn.recv_bytes_into(pixels)
                    items.append(Prepared(task, group, torch.frombuffer(pixels, dtype=torch.uint8).view(h, w, 3)))
            except (EOFError, OSError):
                return  # the worker stopped

            def deliver(answer: list | BaseException, request: int = request) -> None:
                if isinstance(answer, BaseException):
                    worker.send(("error", request, 500, f"the batch failed: {answer}"))
                else:
                    worker.send(("answer", request, answer))

            try:
                self.batcher.submit_with(items, top_k, deliver)
            except QueueFullError as e:
                worker.send(("error", request, 503, f"too busy: {e}"))

    def _poll(self) -> None:
        while not self.stopping.wait(self.config.poll_seconds):
            try:
                changes = self.predictor.refresh()
            except SSFTasksError:
                continue  # a registry briefly unreadable: try again next time
            if any(changes.values()):
                catalog = self.predictor.catalog()
                for worker in list(self.workers):
                    worker.send(("catalog", catalog))
            self.metrics.tasks.set(len(self.predictor.task_names))

    def supervise(self, stop: threading.Event) -> None:
        """Replace workers that die until ``stop`` is set; then stop the workers (each finishes its requests in
        flight), answer what is queued, and stop the engine."""
        while not stop.wait(0.5):
            for i, worker in enumerate(self.workers):
                if not worker.process.is_alive():
                    _mark_dead(worker.process.pid)
                    worker.conn.close()
                    self.workers[i] = self._spawn()
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()  # SIGTERM: uvicorn's graceful shutdown
        for worker in self.workers:
            worker.process.join(40)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            _mark_dead(worker.process.pid)
        self.stopping.set()
        self.batcher.close()
        self.predictor.close()


def _mark_dead(pid: int | None) -> None:
    if pid is not None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def serve_with_workers(
    predictor: Predictor, config: ServeConfig, host: str, port: int, workers: int, stop: threading.Event
) -> None:
    """Serve on ``host:port`` with ``workers`` HTTP worker processes until ``stop`` is set (by the caller's signal
    handler). ``predictor`` is loaded; it is warmed up here, before any worker accepts a connection.

    Raises:
        SSFTasksError: the address cannot be bound.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise SSFTasksError("set PROMETHEUS_MULTIPROC_DIR before importing the server, so that workers share metrics")
    if config.warm_batch_sizes:
        predictor.warm_up(config.warm_batch_sizes)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SSFTasksError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    try:
        _EngineHost(predictor, config, sock, workers, max(1, (os.cpu_count() or 2) // workers)).supervise(stop)
    finally:
        sock.close()


# ----------------------------------------------------------------------------------------------- worker side
class EngineLink:
    """A worker's backend (see :class:`ssf_tasks.serve.app.Backend`): decodes here, batches in the engine."""

    def __init__(self, conn: Connection, threads: int) -> None:
        self.conn = conn
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssf-decode")
        self.catalog: TaskCatalog | None = None
        self._has_catalog = threading.Event()
        self._pending: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()

    @property
    def task_names(self) -> list[str]:
        return sorted(self.catalog.records) if self.catalog else []

    def record(self, task: str) -> TaskRecord:
        records = self.catalog.records if self.catalog else {}
        if task not in records:
            raise TaskNotFoundError(f"unknown task '{task}'; known tasks: {', '.join(sorted(records)) or 'none'}")
        return records[task]

    def prepare(self, image: bytes, task: str, name: str) -> Prepared:
        if self.catalog is None:
            raise RequestRejected(503, "the server is not ready")
        return self.catalog.prepare(image, task, name)

    async def submit(self, items: Sequence[Prepared], top_k: int) -> list:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        request = next(self._ids)
        self._pending[request] = (loop, future)
        try:
            await loop.run_in_executor(self.pool, self._send, request, top_k, items)
        except OSError as e:
            self._pending.pop(request, None)
            raise RequestRejected(503, "the engine process stopped") from e
        return await future

    def _send(self, request: int, top_k: int, items: Sequence[Prepared]) -> None:
        heads = [(item.task, item.group, tuple(item.image.shape[:2])) for item in items]
        with self._send_lock:
            self.conn.send(("infer", request, top_k, heads))
            for item in items:
                self.conn.send_bytes(item.image.contiguous().view(-1).numpy())  # one flat buffer

    @property
    def depth(self) -> int | None:
        return None  # the engine process reports the queue depth

    async def start(self, metrics: Metrics) -> None:
        threading.Thread(target=self._receive, name="ssf-link", daemon=True).start()
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, self._has_catalog.wait, 120):
            raise SSFTasksError("the engine process sent no task catalog")

    async def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.conn.close()

    def _receive(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "catalog":
                self.catalog = message[1]
                self._has_catalog.set()
                continue
            loop, future = self._pending.pop(message[1], (None, None))
            if loop is None:
                continue
            answer = message[2] if message[0] == "answer" else RequestRejected(message[2], message[3])
            loop.call_soon_threadsafe(resolve_future, future, answer)
        for loop, future in list(self._pending.values()):  # the engine is gone: fail what waits, then stop
            loop.call_soon_threadsafe(resolve_future, future, RequestRejected(503, "the engine process stopped"))
        self._pending.clear()
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_main(conn: Connection, sock: socket.socket, config: ServeConfig, threads: int) -> None:
    """A worker process: the app over an :class:`EngineLink`, served by uvicorn on the shared socket."""
    import uvicorn

    os.setpgrp()  # Ctrl-C reaches the engine only, which stops the workers in order
    torch.set_num_threads(1)
    app = create_app(EngineLink(conn, threads), config)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=30))
    server.run(sockets=[sock])
