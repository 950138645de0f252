"""`ssf-tasks task add` killed for real (SIGINT, SIGTERM, SIGKILL) at random moments, the final commit included, on
an SQLite file and on a real PostgreSQL database: the registry afterwards is as before (SQLite: byte for byte;
both: every row of every table, payloads included) or holds the complete new version, and nothing else changed;
`task list` works and a re-run succeeds. SIGINT and SIGTERM end with one line and no traceback.

Every trial runs on a copy of one prepared registry (a backbone and a task): a copy of the SQLite file, or a
PostgreSQL database created from the prepared one as its template and dropped after the trial.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import save_file
from sqlalchemy import Engine, MetaData, create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from conftest import postgres_database, write_image_folder
from ssf_tasks import registry
from ssf_tasks.catalog import add_backbone
from ssf_tasks.engine import load_tasks

CLASSES = ["airplane", "frog", "ship"]
TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "0.01", "--input-size", "48", "--device", "cpu"]
FIRST_EPOCH = "epoch 1/2:"
LAST_EPOCH = "epoch 2/2:"
"""Lines ``task add`` prints on stderr after each epoch; after the last one it evaluates the test split (9 images),
serialises the task and commits it: a few tens of milliseconds on a CPU."""

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
STOPPED = {signal.SIGINT: (130, -2), signal.SIGTERM: (143,), signal.SIGKILL: (-9,)}
"""Exit codes of a stopped command: Ctrl-C is 130, or death by SIGINT where it came before the command's error
boundary exists (Python's own convention); SIGTERM is 143."""

Rows = dict[str, list[dict[str, Any]]]
"""Every table of a registry, by name: its rows as column -> value, in primary-key order."""


def cli(url: str, *args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command(url, *args), capture_output=True, text=True, timeout=timeout, env=environment())


def command(url: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "ssf_tasks_cli", "--registry", url, *map(str, args)]


def environment() -> dict[str, str]:
    """The commands' environment: no debug tracebacks, and one OpenMP thread each, since trials run side by side
    and one command's spinning OpenMP threads would slow the others down."""
    return {**{k: v for k, v in os.environ.items() if k != "SSF_TASKS_DEBUG"}, "OMP_NUM_THREADS": "1"}


def registry_rows(url: str) -> Rows:
    """Every row of every table, read through SQLAlchemy's reflection (not through ssf_tasks), blobs as bytes."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        tables = MetaData()
        tables.reflect(engine)
        rows: Rows = {}
        with engine.connect() as conn:
            for name, table in sorted(tables.tables.items()):
                order = list(table.primary_key.columns) or list(table.columns)
                rows[name] = [
                    {k: bytes(v) if isinstance(v, memoryview) else v for k, v in row._asdict().items()}
                    for row in conn.execute(select(table).order_by(*order))
                ]
        return rows
    finally:
        engine.dispose()


def changed_tables(before: Rows, after: Rows) -> list[str]:
    return sorted(t for t in before.keys() | after.keys() if before.get(t) != after.get(t))


@dataclass
class Backend:
    """One kind of registry database, prepared with backbone ``tr`` and task ``old``."""

    name: str
    copy: Callable[[], AbstractContextManager[str]]
    """A fresh copy of the prepared registry for one trial: yields its URL, deletes it on exit."""
    before: Rows
    sqlite_bytes: bytes | None
    """The prepared SQLite file, byte for byte (None for a server database)."""
    seconds: list[float] = field(default_factory=list)
    """Durations of uninterrupted ``task add`` runs on this backend, for choosing moments within one."""


@dataclass(frozen=True)
class Kill:
    """A signal and when to send it: ``seconds`` after the command printed a line starting with ``after_line``
    (which it must print), or, without one, ``share`` of an uninterrupted run's duration after its start."""

    sig: signal.Signals
    when: str
    after_line: str | None = None
    seconds: float = 0.0
    share: float = 0.0

    def delay(self, backend: Backend) -> float:
        return self.seconds if self.after_line else self.share * statistics.median(backend.seconds)


@dataclass
class Prepared:
    root: Path
    sqlite_url: str
    seconds: float


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """An SQLite registry holding one backbone and one task, and a dataset of JPEG files."""
    root = tmp_path_factory.mktemp("kills")
    torch.manual_seed(0)
    save_file(timm.create_model("test_resnet").state_dict(), root / "w.safetensors")
    write_image_folder(root / "data", CLASSES, {"train": 24, "val": 3, "test": 3}, size=48)
    url = f"sqlite:///{root / 'registry.db'}"
    engine = registry.open_registry(url)
    add_backbone(engine, "tr", "test_resnet", root / "w.safetensors")
    engine.dispose()
    started = time.monotonic()
    done = cli(url, "task", "add", "old", "--backbone", "tr", "--data", root / "data", *TRAIN)
    assert done.returncode == 0, done.stderr
    return Prepared(root, url, time.monotonic() - started)


@pytest.fixture(scope="module")
def sqlite_backend(prepared: Prepared) -> Backend:
    pristine = (prepared.root / "registry.db").read_bytes()

    @contextmanager
    def copy() -> Iterator[str]:
        work = prepared.root / f"trial-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        (work / "registry.db").write_bytes(pristine)
        yield f"sqlite:///{work / 'registry.db'}"
        shutil.rmtree(work)

    return Backend("sqlite", copy, registry_rows(prepared.sqlite_url), pristine, [prepared.seconds])


@pytest.fixture(scope="module")
def postgresql_backend(prepared: Prepared, postgres_admin: Engine) -> Iterator[Backend]:
    """The prepared registry copied into a PostgreSQL database of its own, the template of every trial's."""
    with postgres_database(postgres_admin) as url:
        source, target = registry.open_registry(prepared.sqlite_url), registry.open_registry(url)
        with Session(source) as s:
            backbones = registry.list_backbones(s)
            tasks = [(r, registry.get_task_payload(s, r.name, r.version)) for r in registry.list_tasks(s)]
        with registry.transaction(target, "copying the prepared registry") as s:
            for backbone in backbones:
                registry.add_backbone(s, backbone)
            for record, payload in tasks:
                registry.add_task_version(s, record, payload, new_version=False)
        source.dispose()
        target.dispose()  # a template must have no connection left when it is copied
        template = make_url(url).database
        yield Backend(
            "postgresql",
            lambda: postgres_database(postgres_admin, template=template),
            registry_rows(url),
            None,
            [prepared.seconds],
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return request.getfixturevalue(f"{request.param}_backend")


def kill_task_add(url: str, root: Path, kill: Kill, delay: float) -> tuple[int, str]:
    """Run ``task add new``, send the signal ``delay`` seconds after its start or after ``kill.after_line``, and
    return its exit code and stderr."""
    process = subprocess.Popen(
        command(url, "task", "add", "new", "--backbone", "tr", "--data", root / "data", *TRAIN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            if kill.after_line and line.startswith(kill.after_line):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if kill.after_line:
        while not seen.wait(0.002) and reader.is_alive():
            pass
        assert seen.is_set(), f"`task add` never printed {kill.after_line!r}: {''.join(lines)}"
    time.sleep(delay)
    process.send_signal(kill.sig)
    process.wait(timeout=120)
    reader.join(timeout=30)
    return process.returncode, "".join(lines)


def assert_complete_new_version(backend: Backend, after: Rows, url: str) -> None:
    """``after`` is the prepared registry plus task ``new`` version 1, every row of it (its routing entry included),
    its payload loadable."""
    before = backend.before
    assert after.keys() == before.keys()
    for table in sorted(before.keys() - {"tasks", "task_versions", "task_routing"}):
        assert after[table] == before[table], f"table {table} changed"
    # The version's routing entry is written in the same transaction: exactly one new row, intact.
    assert [r for r in after["task_routing"] if r["task_name"] != "new"] == before["task_routing"]
    (routing,) = [r for r in after["task_routing"] if r["task_name"] == "new"]
    assert routing["version"] == 1
    assert hashlib.sha256(routing["payload"]).hexdigest() == routing["payload_sha256"]
    assert [r for r in after["tasks"] if r["name"] != "new"] == before["tasks"]
    assert [r["last_version"] for r in after["tasks"] if r["name"] == "new"] == [1]
    assert [r for r in after["task_versions"] if r["task_name"] != "new"] == before["task_versions"]
    (row,) = [r for r in after["task_versions"] if r["task_name"] == "new"]
    classes = row["class_names"] if isinstance(row["class_names"], list) else json.loads(row["class_names"])
    (backbone,) = before["backbones"]
    assert (row["version"], row["backbone_name"], classes) == (1, "tr", CLASSES)
    assert row["backbone_fingerprint"] == backbone["fingerprint"]
    assert hashlib.sha256(row["payload"]).hexdigest() == row["payload_sha256"]
    engine = registry.open_registry(url)
    try:
        loaded = load_tasks(engine, ["old", "new"])
    finally:
        engine.dispose()
    assert loaded.tasks["new"].version == 1
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.models["tr"](images, ["new", "old"])
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()


def one_trial(backend: Backend, root: Path, kill: Kill) -> str:
    """One killed ``task add`` on a fresh copy of the prepared registry; returns what it left."""
    sig, delay = kill.sig, kill.delay(backend)
    with backend.copy() as url:
        returncode, err = kill_task_add(url, root, kill, delay)
        moment = f"{delay:.3f} s after " + (repr(kill.after_line) if kill.after_line else "the start")
        where = f"{backend.name}, {sig.name} {moment}: exit code {returncode}, stderr {err[-2000:]!r}"
        listed = cli(url, "task", "list", "--json")
        assert listed.returncode == 0, (where, listed.stderr)
        names = [json.loads(line)["name"] for line in listed.stdout.splitlines()]
        assert "Traceback" not in err, where
        after = registry_rows(url)
        if "new" in names:  # finished first, or the signal came while the interpreter was exiting
            assert names == ["new", "old"], where
            assert returncode in (0, -sig.value, *STOPPED[sig]), where
            assert_complete_new_version(backend, after, url)
            outcome, version = "complete new version", 2
        else:
            assert names == ["old"], where
            assert returncode in STOPPED[sig], where
            if sig != signal.SIGKILL:
                errors = [line for line in err.splitlines() if line.startswith("error: ")]
                assert len(errors) == 1 and ("interrupted" in errors[0] or "terminated" in errors[0]), where
            assert after == backend.before, (
                f"{where}: nothing stored, yet {changed_tables(backend.before, after)} changed"
            )
            if backend.sqlite_bytes is not None:
                db = Path(make_url(url).database or "")
                assert db.read_bytes() == backend.sqlite_bytes, f"{where}: the file changed although nothing was stored"
                assert not any(p.name.startswith("registry.db-") for p in db.parent.iterdir()), where
            outcome, version = "unchanged", 1
        started = time.monotonic()
        again = cli(url, "task", "add", "new", "--backbone", "tr", "--data", root / "data", *TRAIN, "--new-version")
        backend.seconds.append(time.monotonic() - started)
        assert again.returncode == 0, (where, again.stderr)
        assert f"stored task 'new' version {version}:" in again.stdout, (where, again.stdout)
    return outcome


def run_trials(backend: Backend, root: Path, kills: list[Kill], workers: int) -> Counter[tuple[str, str, str]]:
    """The trials, ``workers`` at a time (each on its own copy of the registry): prints how many left what, then
    fails with every failed trial's reason."""

    def attempt(kill: Kill) -> tuple[str, str | None]:
        try:
            return one_trial(backend, root, kill), None
        except Exception as e:  # an AssertionError, or a command that hung
            return "failed", f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(attempt, kills))
    counts = Counter((kill.sig.name, kill.when, outcome) for kill, (outcome, _) in zip(kills, results, strict=True))
    for (sig_name, when, outcome), count in sorted(counts.items()):
        print(f"{backend.name} {sig_name} {when}: {outcome} x{count}")
    failures = [reason for _, reason in results if reason is not None]
    assert not failures, f"{len(failures)} of {len(kills)} trials failed:\n\n" + "\n\n".join(failures)
    return counts


def test_a_killed_task_add_leaves_the_registry_whole(backend: Backend, prepared: Prepared):
    kills = [
        Kill(signal.SIGINT, "importing", share=0.4),
        Kill(signal.SIGTERM, "training", after_line=FIRST_EPOCH),
        Kill(signal.SIGKILL, "final commit", after_line=LAST_EPOCH, seconds=0.03),
    ]
    assert run_trials(backend, prepared.root, kills, workers=3).total() == 3


@pytest.mark.slow
def test_twenty_four_random_kills(backend: Backend, prepared: Prepared):
    """8 kills of each signal: half at a moment drawn over a whole run, half within 120 ms of the last epoch's
    line, while the test split is evaluated, the new version committed and the registry closed."""
    rng = random.Random(0)
    kills = [
        Kill(sig, "anywhere", share=rng.uniform(0.05, 1.0))
        if (trial // 3) % 2 == 0
        else Kill(sig, "final commit", after_line=LAST_EPOCH, seconds=rng.uniform(0.0, 0.12))
        for trial, sig in enumerate(SIGNALS * 8)
    ]
    assert run_trials(backend, prepared.root, kills, workers=2).total() == 24


LATE_SIGNALS = """
import atexit, os, signal, sys
from ssf_tasks_cli import main, state

def close_after_signals(self, close=state.AppState.close):
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)
    close(self)

state.AppState.close = close_after_signals
atexit.register(os.kill, os.getpid(), signal.SIGTERM)
sys.argv = ["ssf-tasks", *sys.argv[1:]]
main()
"""
"""``ssf-tasks`` with SIGTERM and SIGINT delivered once the command is over: while the registry is closed and while
the interpreter exits (after torch's own exit handlers were registered)."""


@pytest.mark.parametrize("backend_name", ["sqlite", "postgresql"])
def test_signals_after_the_command_change_nothing(backend_name: str, prepared: Prepared, request):
    backend = request.getfixturevalue(f"{backend_name}_backend")
    with backend.copy() as url:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                LATE_SIGNALS,
                "--registry",
                url,
                "task",
                "add",
                "new",
                "--backbone",
                "tr",
                "--data",
                prepared.root / "data",
                *TRAIN,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=environment(),
        )
        assert (done.returncode, done.stderr.count("Traceback")) == (0, 0), done.stderr
        listed = cli(url, "task", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(json.loads(line)["name"] for line in listed.stdout.splitlines()) == ["new", "old"]
