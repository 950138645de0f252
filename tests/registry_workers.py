"""Registry writers and readers that tests/test_registry.py runs as separate processes (multiprocessing, spawn).

A module of its own, importing neither pytest fixtures nor torch, so that a spawned worker starts in well under a
second. Every worker puts exactly one message on its queue, whatever happens (a traceback if it failed), so
that the test never waits on a worker that died.
"""

from __future__ import annotations

import hashlib
import time
import traceback
from datetime import datetime, timezone
from typing import Any

from sqlalchemy.orm import Session

from ssf_tasks.config import TaskMetrics, TaskRecord, TrainConfig
from ssf_tasks.errors import DuplicateTaskError, TaskNotFoundError
from ssf_tasks.registry import (
    add_task_version,
    get_task,
    get_task_payload,
    list_task_versions,
    list_tasks,
    open_registry,
)

FINGERPRINT = hashlib.sha256(b"vit-tiny weights").hexdigest()
"""Fingerprint of the backbone ``vit-tiny`` the tests register."""


def payload(seed: int) -> bytes:
    """Incompressible, non-UTF-8 bytes of a realistic size (128 KiB), different for every seed."""
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(4096))


def task_record(name: str, seed: int) -> TaskRecord:
    """A record whose ``train_config.seed`` says which ``payload(seed)`` belongs to it, so a reader can check."""
    return TaskRecord(
        name=name,
        backbone="vit-tiny",
        backbone_fingerprint=FINGERPRINT,
        class_names=[f"class-{seed}", "other"],
        train_config=TrainConfig(epochs=1, seed=seed),
        metrics=TaskMetrics(val_top1=0.5, test_top1=None, epochs_run=1, train_seconds=1.0, best_epoch=1),
        created_at=datetime(2025, 6, 7, 8, 9, 10, tzinfo=timezone.utc),
    )


def _report(queue: Any, worker: int, body: Any) -> None:
    try:
        queue.put((worker, "ok", body()))
    except BaseException:
        queue.put((worker, "crashed", traceback.format_exc()))


def register_new_tasks(url: str, barrier: Any, queue: Any, worker: int, names: list[str], hold: float) -> None:
    """Register each of ``names`` as a new task (``new_version=False``), in step with the other workers.

    The transaction stays open ``hold`` seconds after the write, so the other worker tries the same name while
    this one's row is still uncommitted. Reports ``{name: ("stored", version) | ("duplicate", message, field)}``.
    """

    def body() -> dict[str, tuple[Any, ...]]:
        engine = open_registry(url)
        outcomes: dict[str, tuple[Any, ...]] = {}
        try:
            for name in names:
                barrier.wait(timeout=60)
                try:
                    with Session(engine) as s, s.begin():
                        stored = add_task_version(s, task_record(name, worker), payload(worker), new_version=False)
                        time.sleep(hold)
                    outcomes[name] = ("stored", stored.version)
                except DuplicateTaskError as e:
                    outcomes[name] = ("duplicate", str(e), e.field)
        finally:
            engine.dispose()
        return outcomes

    _report(queue, worker, body)


def add_versions(
    url: str, barrier: Any, queue: Any, worker: int, name: str, seeds: list[int], hold: float, reads: Any = None
) -> None:
    """Add one version of ``name`` per seed (``new_version=True``); reports ``[(version, seed), ...]`` in order.

    Each transaction stays open ``hold`` seconds after its write (a version written but not yet committed). With
    ``reads`` (the readers' shared count of finished reads, see ``poll_task``), the next write waits until two more
    reads have finished (10 s at most), so readers surely read between writes: SQLite's busy timeout is not
    fair, and writers taking the lock back at once could keep readers out until the end.
    """

    def body() -> list[tuple[int, int]]:
        engine = open_registry(url)
        done: list[tuple[int, int]] = []
        try:
            barrier.wait(timeout=60)
            for seed in seeds:
                with Session(engine) as s, s.begin():
                    stored = add_task_version(s, task_record(name, seed), payload(seed), new_version=True)
                    time.sleep(hold)
                done.append((stored.version, seed))
                if reads is not None:
                    wanted, deadline = reads.value + 2, time.monotonic() + 10
                    while reads.value < wanted and time.monotonic() < deadline:
                        time.sleep(0.002)
        finally:
            engine.dispose()
        return done

    _report(queue, worker, body)


def poll_task(url: str, barrier: Any, queue: Any, worker: int, name: str, stop: Any, reads: Any) -> None:
    """Read ``name`` over and over (versions, payloads, latest, listing) until ``stop`` is set, then once more.

    Each finished read adds one to ``reads`` (a shared ``multiprocessing.Value``). On SQLite every transaction, a
    reading one too, takes the write lock: a short pause between reads lets the writers in.

    Reports ``{"polls": n, "counts": sorted distinct version counts seen, "problems": [...]}``; a problem is
    anything a half-written or lost version would show: a gap in the version numbers, a version count going
    down, a payload that is not the bytes its record names or does not match its sha256.
    """

    def check(s: Session, problems: list[str], last_count: int) -> int:
        try:
            records = list_task_versions(s, name)
        except TaskNotFoundError:
            records = []
        versions = [r.version for r in records]
        if versions != list(range(1, len(versions) + 1)):
            problems.append(f"versions {versions} are not 1..{len(versions)}")
        if len(versions) < last_count:
            problems.append(f"saw {last_count} versions, then only {len(versions)}")
        for record in records:
            data = get_task_payload(s, name, record.version)  # raises if the bytes do not match their sha256
            if data != payload(record.train_config.seed) or hashlib.sha256(data).hexdigest() != record.payload_sha256:
                problems.append(f"version {record.version}: payload is not the one its record names")
        if records:
            # Later statements may see later commits (PostgreSQL's read committed), never earlier ones.
            latest = get_task(s, name)
            if latest.version < versions[-1]:
                problems.append(f"latest is version {latest.version} after listing {versions}")
            if get_task_payload(s, name, latest.version) != payload(latest.train_config.seed):
                problems.append(f"latest version {latest.version}: wrong payload")
            listed = {r.name: r.version for r in list_tasks(s)}
            if listed.get(name, 0) < versions[-1]:
                problems.append(f"list_tasks shows {listed} after listing {versions}")
        return len(versions)

    def body() -> dict[str, Any]:
        engine = open_registry(url)
        problems: list[str] = []
        counts: set[int] = set()
        polls, count = 0, 0
        try:
            barrier.wait(timeout=60)
            while True:
                final = stop.is_set()
                with Session(engine) as s, s.begin():
                    count = check(s, problems, count)
                counts.add(count)
                polls += 1
                with reads.get_lock():
                    reads.value += 1
                if final:
                    break
                time.sleep(0.005)
        finally:
            engine.dispose()
        return {"polls": polls, "counts": sorted(counts), "final": count, "problems": problems[:10]}

    _report(queue, worker, body)


def open_only(url: str, barrier: Any, queue: Any, worker: int) -> None:
    """Open the registry (creating its tables if nobody has yet) at the same moment as the other workers."""

    def body() -> None:
        barrier.wait(timeout=60)
        open_registry(url).dispose()

    _report(queue, worker, body)
