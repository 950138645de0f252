"""``ssf-tasks serve``: the HTTP server over every registered task (needs the ``serve`` extra)."""

from __future__ import annotations

import signal
from typing import Annotated, Literal

import typer

from .state import DecodeMode, DecodeThreads, engine_of, stderr

__all__ = ["serve"]


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    precision: Annotated[Literal["fp32", "bf16"], typer.Option("--precision")] = "fp32",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Images per forward at most.")] = 64,
    max_delay_ms: Annotated[
        float, typer.Option("--max-delay-ms", min=0, help="How long a batch waits for more images.")
    ] = 5.0,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Images waiting at once (then 503).")] = 4096,
    max_images: Annotated[int, typer.Option("--max-images", min=1, help="Images in one request at most.")] = 256,
    max_body_mb: Annotated[float, typer.Option("--max-body-mb", min=0.01, help="Request body size at most.")] = 32.0,
    poll_seconds: Annotated[
        float, typer.Option("--poll-seconds", min=0.05, help="How often new or removed tasks are picked up.")
    ] = 1.0,
    compile_forward: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the forward per batch bucket, warmed up before serving (default: on CUDA).",
            show_default=False,
        ),
    ] = None,
    threads: DecodeThreads = None,
    decode: DecodeMode = "auto",
    http_workers: Annotated[
        int,
        typer.Option(
            "--http-workers",
            min=1,
            help="HTTP worker processes that parse requests and decode images in front of the one GPU engine "
            "process (1: all in one process).",
        ),
    ] = 1,
) -> None:
    """Serve every registered task over HTTP, batching requests of all tasks together; new tasks are picked up
    while it runs. SIGTERM or Ctrl-C finishes the requests in flight, then stops."""
    if http_workers > 1:
        _serve_with_workers(ctx, host, port, device, precision, compile_forward, http_workers, max_batch_size,
                            max_delay_ms, max_queue, max_images, max_body_mb, poll_seconds)  # fmt: skip
        return
    try:
        import uvicorn

        from ssf_tasks.serve.app import create_app
    except ImportError as e:
        from ssf_tasks.errors import SSFTasksError

        raise SSFTasksError(f"the server needs the serve extra: pip install 'ssf-tasks[serve]' ({e})") from e
    from ssf_tasks.engine import Predictor

    predictor = Predictor(
        engine_of(ctx), device=device, precision=precision, compile=compile_forward, threads=threads, decode=decode
    )
    config = _config(predictor, compile_forward, max_batch_size, max_delay_ms, max_queue, max_images, max_body_mb,
                     poll_seconds)  # fmt: skip
    stderr.print(f"serving {len(predictor.task_names)} tasks on http://{host}:{port} ({predictor.device})")
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again for the handler it found: this one,
    # so that a stop it was asked for ends with exit code 0 and one line, not a death by signal.
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.run(
            create_app(predictor, config), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30
        )
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stderr.print("stopped")


def _config(predictor, compile_forward, max_batch_size, max_delay_ms, max_queue, max_images, max_body_mb,
            poll_seconds):  # fmt: skip
    """The server's config; compiling defaults to on for CUDA, with four batch buckets warmed up."""
    from ssf_tasks.serve.app import ServeConfig

    if compile_forward is None:
        predictor.compile = predictor.device.type == "cuda"
    buckets = tuple(sorted({min(b, max_batch_size) for b in (1, 8, 32, max_batch_size)})) if predictor.compile else ()
    return ServeConfig(
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_images=max_images,
        max_body_bytes=int(max_body_mb * 2**20),
        poll_seconds=poll_seconds,
        warm_batch_sizes=buckets,
    )


def _serve_with_workers(ctx, host, port, device, precision, compile_forward, workers, *limits) -> None:
    """The engine in this process, ``workers`` HTTP worker processes in front (see ssf_tasks.serve.http_workers)."""
    import os
    import shutil
    import tempfile
    import threading

    metrics_dir = tempfile.mkdtemp(prefix="ssf-tasks-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before prometheus_client is imported, here and in workers
    try:
        try:
            import uvicorn  # noqa: F401  (the workers run it)

            from ssf_tasks.serve.http_workers import serve_with_workers
        except ImportError as e:
            from ssf_tasks.errors import SSFTasksError

            raise SSFTasksError(f"the server needs the serve extra: pip install 'ssf-tasks[serve]' ({e})") from e
        from ssf_tasks.engine import Predictor

        # Workers decode; the engine process only batches, so it needs no decoders of its own.
        predictor = Predictor(
            engine_of(ctx), device=device, precision=precision, compile=compile_forward, threads=1, decode="threads"
        )
        config = _config(predictor, compile_forward, *limits)
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
        stderr.print(
            f"serving {len(predictor.task_names)} tasks on http://{host}:{port} ({predictor.device}, "
            f"{workers} HTTP workers)"
        )
        try:
            serve_with_workers(predictor, config, host, port, workers, stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    stderr.print("stopped")


class _Stopped(Exception):
    """A stop signal that arrived after (or without) uvicorn's graceful shutdown."""


def _stopped(signum: int, frame: object) -> None:
    raise _Stopped
