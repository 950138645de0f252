"""The ``ssf-tasks`` application: global options, the error boundary, and the top-level commands.

Sub-apps, one per noun, live beside this file (``backbone``, ``task``; ``bench`` when present). Every command
is a thin call into :mod:`ssf_tasks.service`.

Errors: :class:`_CleanErrors` is the one place where an :class:`~ssf_tasks.errors.SSFTasksError` (or an
invalid option value, a file system error, Ctrl-C) becomes ``error: <one line>`` on stderr and a non-zero
exit code (1; 130 for Ctrl-C).
Set ``SSF_TASKS_DEBUG=1`` to get the traceback instead.
"""

from __future__ import annotations

import os
import re
import signal
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from ssf_tasks.errors import SSFTasksError

from . import backbone, task
from .serve import serve
from .state import AppState, DecodeMode, DecodeThreads, engine_of, stderr, stdout

__all__ = ["app", "main"]

DEBUG_ENV = "SSF_TASKS_DEBUG"

# The library's errors name the argument they are about as Python spells it; here they name the flag.
FIELD_FLAGS = {
    "batch_size": "--batch-size",
    "device": "--device",
    "init_from": "--init-from",
    "lr": "--lr",
    "new_version": "--new-version",
    "nproc": "--nproc",
    "precision": "--precision",
    "top_k": "--top-k",
    "weights": "--weights",
}


def _one_line(error: BaseException) -> str:
    if isinstance(error, ValidationError):  # options checked by a pydantic model, e.g. TrainConfig
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"invalid {where}: {first['msg']}"
    text = error.format_message() if isinstance(error, typer.TyperException) else str(error)
    text = text.strip() or type(error).__name__
    field = getattr(error, "field", None)
    if field in FIELD_FLAGS:
        text = re.sub(rf"\b{field}\b", FIELD_FLAGS[field], text)
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.strerror}: {error.filename}"
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C: training stops and stores nothing, files are not half
    written, and the command ends with one line and exit code 143."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated("terminated")


class _CleanErrors(TyperGroup):
    """The root command group; every sub-command runs inside its ``invoke``, so this is the error boundary."""

    #: Set by the console entry point, where the process ends with the command: once the command is over, SIGINT
    #: and SIGTERM stay ignored, so a late signal cannot turn a finished command into a traceback while the
    #: interpreter exits. In-process callers (tests, other programs) get their handlers back instead.
    whole_process: bool = False

    def invoke(self, ctx: typer.Context) -> Any:
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if in_main_thread else None
        try:
            return super().invoke(ctx)
        except typer.TyperException as error:  # a missing option, a bad value, an unknown command
            if os.environ.get(DEBUG_ENV) == "1" or not hasattr(error, "format_message"):
                raise
            typer.echo(f"error: {_one_line(error)} (see --help)", err=True)
            raise typer.Exit(getattr(error, "exit_code", 2)) from None
        except (SSFTasksError, ValidationError, OSError, KeyboardInterrupt) as error:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            interrupted = isinstance(error, KeyboardInterrupt)
            message = _one_line(error) if not (interrupted and not str(error)) else "interrupted"
            typer.echo(f"error: {message}", err=True)
            terminated = isinstance(error, Terminated) or isinstance(error.__context__, Terminated)
            raise typer.Exit(143 if terminated else 130 if interrupted else 1) from None
        finally:
            # The command's outcome is settled (stored, or reported): a signal now must not interrupt the
            # clean-up and print a traceback from it.
            if in_main_thread:
                previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            state = ctx.find_object(AppState)
            if state is not None:
                state.close()
            if in_main_thread and not self.whole_process:
                signal.signal(signal.SIGINT, previous_int)
                signal.signal(signal.SIGTERM, previous)


app = typer.Typer(
    cls=_CleanErrors,
    name="ssf-tasks",
    help="One frozen timm backbone, many tasks: train, store, serve and export SSF tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.add_typer(backbone.app, name="backbone")
app.add_typer(task.app, name="task")
app.command("serve")(serve)
try:  # the benchmark commands are optional (they need GPU-side extras)
    from .bench import app as bench_app
except ImportError:
    bench_app = None
if bench_app is not None:
    app.add_typer(bench_app, name="bench")


@app.callback()
def _root(
    ctx: typer.Context,
    registry: Annotated[
        str | None,
        typer.Option(
            "--registry",
            envvar="SSF_TASKS_REGISTRY",
            help="Registry as an SQLAlchemy URL (default: sqlite file in $SSF_TASKS_HOME, ~/.ssf-tasks).",
            show_envvar=True,
        ),
    ] = None,
) -> None:
    """One frozen timm backbone, many tasks: train, store, serve and export SSF tasks."""
    ctx.obj = AppState(registry_url=registry)


@app.command("predict")
def predict_command(
    ctx: typer.Context,
    source: Annotated[
        Path,
        typer.Argument(
            help="Manifest CSV with header 'path,task' (task 'auto': the image's task is found by routing), or a "
            "folder of images (with --task)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option("--out", help="Predictions CSV to write: path,task,label,score (+ route_score for 'auto')."),
    ],
    task_name: Annotated[
        str | None, typer.Option("--task", help="Run every image of the SOURCE folder through this task.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Labels per image (extra label_N,score_N).")] = 1,
    compile_forward: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the mixed-task forward (default: on CUDA for 8 batches or more).",
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        Literal["fp32", "bf16"],
        typer.Option("--precision", help="fp32, or bf16 autocast (scores differ by about 1e-2)."),
    ] = "fp32",
    threads: DecodeThreads = None,
    decode: DecodeMode = "auto",
    routing: Annotated[
        Literal["knn", "prototype"],
        typer.Option("--routing", help="How 'auto' rows find their task: nearest stored images, or class means."),
    ] = "knn",
) -> None:
    """Predict a manifest mixing any registered tasks, in batches of mixed tasks through one backbone pass."""
    from ssf_tasks.data import read_predict_manifest
    from ssf_tasks.engine import Predictor, folder_items
    from ssf_tasks.predictions_csv import write_predictions

    if task_name is not None:
        items = folder_items(source, task_name)
    else:
        if source.is_dir():
            raise SSFTasksError(f"{source} is a folder: pass --task NAME to predict a folder of images")
        items = read_predict_manifest(source)
    engine = engine_of(ctx)
    predictor = Predictor(
        engine,
        _known_tasks(engine, items, str(source)),
        device=device,
        precision=precision,
        compile=compile_forward,
        threads=threads,
        decode=decode,
        routing=routing,
    )
    try:
        predictions = predictor.predict(items, batch_size=batch_size, top_k=top_k, source=str(source))
    finally:
        predictor.close()
    write_predictions(predictions, out, top_k=top_k)
    tasks = sorted({p.task for p in predictions})
    timing = predictor.last_timing
    stderr.print(
        f"loaded {len(predictor.task_names)} tasks in {predictor.load_seconds:.1f} s; first batch answered after "
        f"{timing['first_batch_s']:.1f} s; {len(predictions)} images in {timing['total_s']:.1f} s"
    )
    stdout.print(f"wrote {len(predictions)} predictions ({', '.join(tasks)}) to {out}")


@app.command("export")
def export_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task to export.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for model.safetensors + config.json.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Version (default: latest).")] = None,
) -> None:
    """Fold a task into a plain timm model (timm's pretrained format; no ssf_tasks needed to load it)."""
    from ssf_tasks.export import export_task

    folder = export_task(engine_of(ctx), name, out, version=version)
    stdout.print(f"exported task '{name}' to {folder} (load with timm.create_model('local-dir:{folder}'))")


def _known_tasks(engine: Any, items: list, source: str) -> list[str]:
    """The tasks to load for the manifest, after checking each is registered (the error names the first row that is
    not); a row of task ``auto`` needs every registered task, since any of them may be the one it is routed to."""
    from sqlalchemy.orm import Session

    from ssf_tasks import registry
    from ssf_tasks.errors import TaskNotFoundError
    from ssf_tasks.routing import AUTO_TASK

    with Session(engine) as s:
        known = {r.name for r in registry.list_tasks(s)}
    for row, (path, name) in enumerate(items, start=1):
        if name not in known and name != AUTO_TASK:
            listing = ", ".join(sorted(known)) if known else "none"
            raise TaskNotFoundError(f"{source} row {row} ({path}): unknown task '{name}'; known tasks: {listing}")
    named = {name for _, name in items}
    return sorted(known if AUTO_TASK in named else named)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
