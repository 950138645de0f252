"""The FastAPI app: routes shaped after the open inference protocol (v2), a mixed-task route, metrics, hot reload.

Routes:
    ``GET /v2/health/live``, ``GET /v2/health/ready``: liveness; readiness (503 until warmed up, and while stopping).
    ``GET /v2/models``: the served tasks. ``GET /v2/models/{task}``: a task's version and classes.
    ``GET /v2/models/{task}/ready``: 200 if the task is served, 404 if not.
    ``POST /v2/models/{task}/infer``: one image as the raw body (``image/jpeg``, ``image/png``, ...), or JSON
    ``{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [n], "data": ["<base64>", ...]}],
    "parameters": {"top_k": k}}``.
    ``POST /v2/infer``: many tasks in one call: ``{"inputs": [{"task": "a", "data": "<base64>"}, ...], "top_k": k}``.
    A task of ``auto`` (in either route) lets the server pick the task (:mod:`ssf_tasks.routing`): the output names
    it (``none`` when no task fits, with no label) and adds its ``route_score``.
    ``GET /metrics``: Prometheus text format.

Every bad request gets a 4xx with ``{"error": "..."}``; a full queue gets 503.

The app runs over a backend: :class:`LocalBackend` (the Predictor and its batcher in this process) or, in HTTP
worker processes, the link to the one engine process (:mod:`ssf_tasks.serve.http_workers`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from pydantic import BaseModel, ConfigDict, Field

from ..config import TaskRecord
from ..engine import Predictor, Prepared
from ..errors import DataError, SSFTasksError, TaskNotFoundError
from ..routing import AUTO_TASK
from .batcher import Batcher, QueueFullError

__all__ = ["Backend", "LocalBackend", "Metrics", "RequestRejected", "ServeConfig", "create_app"]

IMAGE_TYPES = (
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/bmp",
    "image/gif",
    "image/tiff",
    "application/octet-stream",
)


class ServeConfig(BaseModel):
    """How the server batches and what it accepts."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(64, ge=1, description="images per forward at most")
    max_delay_ms: float = Field(5.0, ge=0, description="how long a batch waits for more images after its first")
    max_queue: int = Field(4096, ge=1, description="images waiting at once; beyond it requests get 503")
    max_images: int = Field(256, ge=1, description="images in one request at most")
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="request body size at most")
    poll_seconds: float = Field(1.0, gt=0, description="how often the registry is checked for new or removed tasks")
    warm_batch_sizes: tuple[int, ...] = Field((), description="batch sizes compiled and run before serving")


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (no process-wide state).

    With several processes (HTTP workers and the engine) ``PROMETHEUS_MULTIPROC_DIR`` is set before
    ``prometheus_client`` is imported; every process then writes its samples there and ``/metrics`` sums them.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ssf_requests", "Requests by task and HTTP status", ["task", "status"], registry=self.registry
        )
        self.images = Counter("ssf_images", "Images answered, by task", ["task"], registry=self.registry)
        self.latency = Histogram(
            "ssf_request_seconds",
            "Request latency by task (mixed requests: task 'mixed')",
            ["task"],
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ssf_batch_size",
            "Images per forward",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ssf_queue_depth", "Images waiting for a batch", registry=self.registry, multiprocess_mode="livesum"
        )
        self.tasks = Gauge("ssf_tasks_served", "Tasks served", registry=self.registry, multiprocess_mode="livemax")

    def observe_batch(self, size: int, waiting: int) -> None:
        self.batch_size.observe(size)
        self.queue_depth.set(waiting)

    def exposition(self) -> bytes:
        """The text format of every process's samples."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            MultiProcessCollector(merged)
            return generate_latest(merged)
        return generate_latest(self.registry)


class Backend(Protocol):
    """What the app asks of the engine: the served tasks, decoding, batched answers."""

    pool: Executor
    """Where ``prepare`` runs."""

    @property
    def task_names(self) -> list[str]: ...

    def record(self, task: str) -> TaskRecord: ...

    def prepare(self, image: bytes, task: str, name: str) -> Prepared: ...

    async def submit(self, items: Sequence[Prepared], top_k: int) -> list: ...

    @property
    def depth(self) -> int | None: ...

    async def start(self, metrics: Metrics) -> None: ...

    async def stop(self) -> None: ...


class LocalBackend:
    """The engine in this process: the Predictor, its batching thread, and the registry polled for changes."""

    def __init__(self, predictor: Predictor, config: ServeConfig) -> None:
        self.predictor = predictor
        self.config = config
        self.pool = predictor.pool
        self.batcher: Batcher | None = None
        self._poller: asyncio.Task | None = None

    @property
    def task_names(self) -> list[str]:
        return self.predictor.task_names

    def record(self, task: str) -> TaskRecord:
        return self.predictor.record(task)

    def prepare(self, image: bytes, task: str, name: str) -> Prepared:
        return self.predictor.prepare(image, task, name=name)

    async def submit(self, items: Sequence[Prepared], top_k: int) -> list:
        if self.batcher is None:
            raise RequestRejected(503, "the server is not ready")
        return await self.batcher.submit(items, top_k)

    @property
    def depth(self) -> int | None:
        return None if self.batcher is None else self.batcher.depth

    async def start(self, metrics: Metrics) -> None:
        loop = asyncio.get_running_loop()
        if self.config.warm_batch_sizes:
            await loop.run_in_executor(None, self.predictor.warm_up, self.config.warm_batch_sizes)
        self.batcher = Batcher(
            self.predictor,
            max_batch_size=self.config.max_batch_size,
            max_delay=self.config.max_delay_ms / 1000,
            max_queue=self.config.max_queue,
            on_batch=metrics.observe_batch,
        )
        self._poller = asyncio.create_task(self._poll(metrics))

    async def _poll(self, metrics: Metrics) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.poll_seconds)
            with contextlib.suppress(SSFTasksError):  # a registry briefly unreadable: try again next time
                await loop.run_in_executor(None, self.predictor.refresh)
            metrics.tasks.set(len(self.predictor.task_names))

    async def stop(self) -> None:
        """Answer what is queued, then stop batching and decoding."""
        if self._poller is not None:
            self._poller.cancel()
        if self.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.batcher.close)
        self.predictor.close()


class RequestRejected(Exception):
    """A request answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(backend: Backend | Predictor, config: ServeConfig | None = None) -> FastAPI:
    """The app over ``backend`` (a loaded Predictor is served in this process); it starts batching and polling the
    registry when it starts."""
    config = config or ServeConfig()
    if isinstance(backend, Predictor):
        backend = LocalBackend(backend, config)
    metrics = Metrics()
    state: dict = {"ready": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backend.start(metrics)
        metrics.tasks.set(len(backend.task_names))
        state["ready"] = True
        try:
            yield
        finally:  # uvicorn has finished the requests in flight; answer what is queued, then stop
            state["ready"] = False
            await backend.stop()

    app = FastAPI(title="ssf-tasks", lifespan=lifespan)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if not state["ready"]:
            return error(503, "not ready")
        return JSONResponse({"ready": True, "tasks": len(backend.task_names)})

    @app.get("/v2/models")
    async def models() -> dict:
        return {"models": [{"name": n, "version": str(backend.record(n).version)} for n in backend.task_names]}

    @app.get("/v2/models/{task}")
    async def model_metadata(task: str) -> Response:
        try:
            record = backend.record(task)
        except TaskNotFoundError as e:
            return error(404, str(e))
        return JSONResponse(
            {
                "name": record.name,
                "versions": [str(record.version)],
                "platform": "ssf-tasks",
                "backbone": record.backbone,
                "labels": record.class_names,
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
                "outputs": [{"name": "label", "datatype": "BYTES", "shape": [-1]}],
            }
        )

    @app.get("/v2/models/{task}/ready")
    async def model_ready(task: str) -> Response:
        if task not in backend.task_names:
            return error(404, f"task '{task}' is not served")
        return JSONResponse({"name": task, "ready": True})

    @app.get("/metrics")
    async def prometheus() -> Response:
        depth = backend.depth
        if depth is not None:
            metrics.queue_depth.set(depth)
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise RequestRejected(413, f"request body of {declared} bytes is over the limit of {config.max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > config.max_body_bytes:
                raise RequestRejected(413, f"request body is over the limit of {config.max_body_bytes} bytes")
        if not body:
            raise RequestRejected(400, "empty request body")
        return bytes(body)

    def parse_json(body: bytes) -> dict:
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestRejected(400, f"invalid JSON: {e}") from e
        if not isinstance(payload, dict):
            raise RequestRejected(400, "the JSON body must be an object")
        return payload

    def decode_base64(value: object, where: str) -> bytes:
        if not isinstance(value, str):
            raise RequestRejected(400, f"{where}: expected a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestRejected(400, f"{where}: invalid base64: {e}") from e

    def read_top_k(value: object) -> int:
        if value is None:
            return 1
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestRejected(400, f"top_k must be a positive integer, got {value!r}")
        return value

    def check_count(count: int) -> None:
        if count == 0:
            raise RequestRejected(400, "no images in the request")
        if count > config.max_images:
            raise RequestRejected(413, f"{count} images in one request; at most {config.max_images}")

    async def answer(pairs: Sequence[tuple[bytes, str]], top_k: int) -> list[dict]:
        loop = asyncio.get_running_loop()

        def prepare(i: int, image: bytes, task: str) -> Prepared:
            return backend.prepare(image, task, f"image {i}")

        try:
            prepared = await asyncio.gather(
                *(loop.run_in_executor(backend.pool, prepare, i, b, t) for i, (b, t) in enumerate(pairs))
            )
        except TaskNotFoundError as e:
            raise RequestRejected(404, str(e)) from e
        except DataError as e:
            raise RequestRejected(400, str(e)) from e
        if not state["ready"]:
            raise RequestRejected(503, "the server is not ready")
        try:
            results = await backend.submit(prepared, top_k)
        except QueueFullError as e:
            raise RequestRejected(503, f"too busy: {e}") from e
        outputs = []
        for (_, task), result in zip(pairs, results, strict=True):
            if isinstance(result, str):
                raise RequestRejected(409, result)
            labels, scores, served_by, route_score = result
            output = {
                "task": served_by,
                "label": labels[0] if labels else None,
                "score": scores[0] if scores else None,
                "labels": labels,
                "scores": scores,
            }
            if task == AUTO_TASK:
                output["route_score"] = route_score
            outputs.append(output)
            metrics.images.labels(served_by).inc()
        return outputs

    async def handle(request: Request, task_label: str, work) -> Response:
        started = time.perf_counter()
        try:
            response = JSONResponse(await work())
        except RequestRejected as e:
            response = error(e.status, str(e))
        metrics.requests.labels(task_label, str(response.status_code)).inc()
        metrics.latency.labels(task_label).observe(time.perf_counter() - started)
        return response

    @app.post("/v2/models/{task}/infer")
    async def infer(task: str, request: Request) -> Response:
        async def work() -> dict:
            if task != AUTO_TASK and task not in backend.task_names:
                raise RequestRejected(
                    404, f"unknown task '{task}'; known tasks: {', '.join(backend.task_names) or 'none'}"
                )
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            body = await read_body(request)
            top_k = 1
            if content_type in IMAGE_TYPES:
                images = [body]
                raw_k = request.query_params.get("top_k")
                top_k = read_top_k(int(raw_k) if raw_k and raw_k.isdigit() else raw_k)
            elif content_type == "application/json":
                payload = parse_json(body)
                inputs = payload.get("inputs")
                if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
                    raise RequestRejected(
                        400, "'inputs' must be a list of one tensor: {name, datatype: BYTES, shape, data}"
                    )
                data = inputs[0].get("data")
                if not isinstance(data, list):
                    raise RequestRejected(400, "inputs[0].data must be a list of base64 strings")
                check_count(len(data))
                images = [decode_base64(v, f"inputs[0].data[{i}]") for i, v in enumerate(data)]
                parameters = payload.get("parameters") or {}
                top_k = read_top_k(parameters.get("top_k") if isinstance(parameters, dict) else None)
            else:
                raise RequestRejected(
                    415, f"unsupported content type '{content_type}': send an image or application/json"
                )
            check_count(len(images))
            outputs = await answer([(b, task) for b in images], top_k)
            version = "routed" if task == AUTO_TASK else str(backend.record(task).version)
            return {"model_name": task, "model_version": version, "outputs": outputs}

        return await handle(request, task if task in backend.task_names else "unknown", work)

    @app.post("/v2/infer")
    async def infer_mixed(request: Request) -> Response:
        async def work() -> dict:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise RequestRejected(415, f"unsupported content type '{content_type}': send application/json")
            payload = parse_json(await read_body(request))
            inputs = payload.get("inputs")
            if not isinstance(inputs, list):
                raise RequestRejected(400, "'inputs' must be a list of {task, data} objects")
            check_count(len(inputs))
            pairs = []
            for i, entry in enumerate(inputs):
                if not isinstance(entry, dict) or not isinstance(entry.get("task"), str):
                    raise RequestRejected(
                        400, f"inputs[{i}] must be an object with a 'task' string and 'data' in base64"
                    )
                pairs.append((decode_base64(entry.get("data"), f"inputs[{i}].data"), entry["task"]))
            return {"outputs": await answer(pairs, read_top_k(payload.get("top_k")))}

        return await handle(request, "mixed", work)

    return app
