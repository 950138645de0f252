"""Train one task with N processes: start the ranks, watch them, and bring rank 0's trained task back.

:func:`train_distributed` has :func:`ssf_tasks.train.train_task`'s signature and contract (the best state ends up in
the caller's model), so :func:`ssf_tasks.training_job.train_and_store` runs it in place of ``train_task`` when
``config.nproc > 1`` and stores the result itself, once, in its one transaction. The ranks never touch the registry.

How a run goes:

* the caller's model (backbone, the task's starting γ/β and head) is saved once to a private temporary folder; every
  rank loads it, so all start from the same numbers;
* ``config.nproc`` processes are spawned; they meet through a file in that folder and form a process group, NCCL with
  one GPU per rank when training on CUDA, gloo on the CPU (CPU ranks split the cores between them);
* each rank runs ``train_task`` with a :class:`~ssf_tasks.data_parallel.DataParallel` (its shard of every batch,
  DDP over the task's γ/β and head only); rank 0 sends its progress reports and, at the end, the trained tensors;
* the launcher waits for all of them. The first rank that fails or dies, or Ctrl-C / SIGTERM in the launcher, stops
  every rank at once, and the error is raised here as one :class:`~ssf_tasks.errors.SSFTasksError` (the rank's own
  traceback is kept as its ``__cause__``). The ranks ignore Ctrl-C themselves, and a rank whose launcher is gone
  exits within a second.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from . import errors
from .config import TrainConfig
from .data_parallel import DataParallel, per_rank_batch
from .errors import SSFTasksError, TrainingError, TrainingInterrupted
from .model import MultiTaskSSF
from .taskfiles import task_payload, task_tensors
from .train import TrainProgress, TrainResult, resolve_device, train_task

__all__ = ["DistributedTrainResult", "check_data_parallel", "train_distributed"]

_POLL_SECONDS = 0.1
_STOP_GRACE_SECONDS = 5.0


@dataclass
class DistributedTrainResult(TrainResult):
    """A :class:`~ssf_tasks.train.TrainResult` of a data-parallel run (``train_seconds`` includes starting the
    processes), with how it ran.

    Attributes:
        nproc: Processes that trained together.
        backend: ``"nccl"`` or ``"gloo"``.
        reduced_per_step: Numbers the gradient all-reduce carried each step: the task's γ/β and head, nothing of
            the backbone.
    """

    nproc: int = 1
    backend: str = "gloo"
    reduced_per_step: int = 0


def check_data_parallel(config: TrainConfig) -> None:
    """Check that ``config.nproc`` processes can train with ``config`` (nothing to check for one process).

    Called before anything is loaded, so a bad combination fails in the first second.

    Raises:
        TrainingError: the batch does not split evenly over the processes (``field="batch_size"``), or CUDA has
            fewer GPUs than processes (``field="nproc"``).
    """
    if config.nproc == 1:
        return
    per_rank_batch(config.batch_size, config.nproc)
    _backend(config)


def _backend(config: TrainConfig) -> str:
    """NCCL with one GPU per process when training on CUDA, else gloo."""
    if resolve_device(config.device).type != "cuda":
        return "gloo"
    gpus = torch.cuda.device_count()
    if config.nproc > gpus:
        raise TrainingError(
            f"nproc {config.nproc} asks for one GPU per process, but {gpus} are visible (use at most {gpus}, or "
            f"train on the CPU)",
            field="nproc",
        )
    if not dist.is_nccl_available():
        raise TrainingError("data-parallel training on CUDA needs NCCL, which this torch build lacks", field="nproc")
    return "nccl"


@dataclass(frozen=True)
class _Job:
    """What every rank is given (picklable: datasets are lists of paths plus a transform)."""

    model_file: Path
    rendezvous: str
    backend: str
    name: str
    train_set: Dataset
    val_set: Dataset | None
    test_set: Dataset | None
    config: TrainConfig


def train_distributed(
    model: MultiTaskSSF,
    name: str,
    train_set: Dataset,
    config: TrainConfig,
    *,
    val_set: Dataset | None = None,
    test_set: Dataset | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
) -> DistributedTrainResult:
    """Train task ``name`` with ``config.nproc`` data-parallel processes and leave its best state in ``model``.

    Same arguments and outcome as :func:`ssf_tasks.train.train_task`; ``progress`` gets rank 0's reports, with
    images per second counted over all ranks.

    Raises:
        TrainingError: a rank failed (its message, e.g. a non-finite loss) or died (its exit code or signal).
        TrainingInterrupted: Ctrl-C or SIGTERM in this process. In every case all ranks are stopped and ``model``
            is unchanged.
    """
    per_rank_batch(config.batch_size, config.nproc)
    backend = _backend(config)
    started = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="ssf-tasks-ranks-") as folder:
        model_file = Path(folder) / "model.pt"
        torch.save(model, model_file)
        job = _Job(model_file, f"file://{folder}/rendezvous", backend, name, train_set, val_set, test_set, config)
        messages = context.Queue()
        ranks = [
            context.Process(target=_run_rank, args=(job, rank, messages), name=f"ssf-tasks rank {rank}")
            for rank in range(config.nproc)
        ]
        try:
            for process in ranks:
                process.start()
            result, payload, reduced = _wait(ranks, messages, progress)
        except KeyboardInterrupt:
            raise TrainingInterrupted(
                f"training of {name!r} interrupted; all {config.nproc} processes were stopped and nothing was changed"
            ) from None
        finally:
            _stop(ranks)
            messages.close()
    model.update_task(name, task_tensors(payload, name))
    return DistributedTrainResult(
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        val_top1=result.val_top1,
        test_top1=result.test_top1,
        train_seconds=time.perf_counter() - started,
        history=result.history,
        nproc=config.nproc,
        backend=backend,
        reduced_per_step=reduced,
    )


# ------------------------------------------------------------------------------------------------ the launcher


class _RemoteTraceback(Exception):
    """A rank's traceback, as text: the ``__cause__`` of the error raised in the launcher (shown in debug mode)."""


def _wait(
    ranks: list[BaseProcess], messages: Any, progress: Callable[[TrainProgress], None] | None
) -> tuple[TrainResult, bytes, int]:
    """Forward rank 0's progress until every rank has exited cleanly; raise the first failure."""
    result = None
    while True:
        try:
            message = messages.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            message = None
        if message is None:
            dead = next((p for p in ranks if p.exitcode not in (None, 0)), None)
            if dead is not None:  # it may have sent its reason just before exiting
                raise _sent_error(ranks, messages) or _death(ranks, dead)
            if all(p.exitcode == 0 for p in ranks):
                if result is None:
                    raise TrainingError("rank 0 finished without sending the trained task; nothing was stored")
                return result
            continue
        kind, rank, body = message
        if kind == "progress":
            if progress is not None:
                progress(body)
        elif kind == "result":
            result = body
        else:
            error = _remote_error(rank, len(ranks), body)
            if _our_error(body[0]) is None:
                # Not one of ours, e.g. a broken connection: often the echo of a peer killed a moment earlier
                # (out of memory), which is then the failure to report.
                time.sleep(_POLL_SECONDS)
                killed = next((p for p in ranks if (p.exitcode or 0) < 0), None)
                if killed is not None:
                    raise _death(ranks, killed)
            raise error


def _sent_error(ranks: list[BaseProcess], messages: Any) -> SSFTasksError | None:
    """The first error a rank sent that is still waiting in ``messages``, if any."""
    try:
        while True:
            kind, rank, body = messages.get(timeout=_POLL_SECONDS)
            if kind == "error":
                return _remote_error(rank, len(ranks), body)
    except queue.Empty:
        return None


def _death(ranks: list[BaseProcess], dead: BaseProcess) -> TrainingError:
    """A rank that exited without saying why: its exit code or signal."""
    code = dead.exitcode or 0
    how = f"exited with code {code}" if code > 0 else f"was killed by signal {-code}"
    if code == -signal.SIGKILL:
        how += " (out of memory?)"
    return TrainingError(
        f"process {ranks.index(dead)} of {len(ranks)} {how}; all processes were stopped and nothing was stored"
    )


def _remote_error(rank: int, world: int, body: tuple[str, str, str | None, str]) -> SSFTasksError:
    """The rank's error as the launcher raises it: the same ``SSFTasksError`` class, message and field when it was
    one (a non-finite loss names ``lr``), else a ``TrainingError`` naming the rank and the exception's type."""
    kind, message, field, trace = body
    ours = _our_error(kind)
    if ours is not None:
        error = ours(message, field=field)
    else:
        error = TrainingError(f"process {rank} of {world} failed: {kind}: {message}; nothing was stored")
    error.__cause__ = _RemoteTraceback(trace)
    return error


def _our_error(kind: str) -> type[SSFTasksError] | None:
    """The ``SSFTasksError`` class named ``kind``, or None for any other exception."""
    known = getattr(errors, kind, None)
    return known if isinstance(known, type) and issubclass(known, SSFTasksError) else None


def _stop(ranks: list[BaseProcess]) -> None:
    """End every rank still running (SIGTERM, then SIGKILL after a grace period) and reap them all."""
    for process in ranks:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _STOP_GRACE_SECONDS
    for process in ranks:
        if process.pid is None:  # never started
            continue
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


# ------------------------------------------------------------------------------------------------- one rank


def _run_rank(job: _Job, rank: int, messages: Any) -> None:
    """A rank's process: train, send rank 0's result, exit 0; on any failure send it and exit 1 (no traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops every rank
    _exit_with_launcher()
    try:
        outcome = _train_rank(job, rank, messages)
        if rank == 0:
            messages.put(("result", rank, outcome))
    except BaseException as error:  # every failure is reported to the launcher, then the rank ends
        report = (type(error).__name__, str(error), getattr(error, "field", None), traceback.format_exc())
        messages.put(("error", rank, report))
        messages.close()
        messages.join_thread()
        sys.exit(1)


def _train_rank(job: _Job, rank: int, messages: Any) -> tuple[TrainResult, bytes, int]:
    world = job.config.nproc
    if job.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))  # the ranks share the cores
        device = torch.device("cpu")
    dist.init_process_group(job.backend, init_method=job.rendezvous, rank=rank, world_size=world)
    try:
        model = torch.load(job.model_file, map_location="cpu", weights_only=False)  # written by our launcher
        parallel = DataParallel(rank, world, device)
        report = (lambda p: messages.put(("progress", rank, p))) if rank == 0 else None
        result = train_task(
            model,
            job.name,
            job.train_set,
            job.config,
            val_set=job.val_set,
            test_set=job.test_set,
            progress=report,
            parallel=parallel,
        )
        return result, task_payload(model.task_state_dict(job.name)), parallel.reduced_per_step
    finally:
        dist.destroy_process_group()


def _exit_with_launcher() -> None:
    """End this rank within a second of its launcher's death (killed, say), even while blocked in a collective."""
    launcher = os.getppid()

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
