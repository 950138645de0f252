"""The registry on a real SQLite file and a real PostgreSQL database: round trips, versioning, errors, transactions,
and concurrent writers and readers in separate processes.

Every test that opens a registry runs on both backends (``registry_url`` in conftest.py); the PostgreSQL server
is the one $SSF_TASKS_TEST_POSTGRES names, and only ``SSF_TASKS_TEST_POSTGRES=off`` skips those.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import registry_workers
from pydantic import ValidationError
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from ssf_tasks.config import (
    BackboneRecord,
    TaskFile,
    TaskMetrics,
    TaskRecord,
    TrainConfig,
    validate_name,
)
from ssf_tasks.errors import (
    BackboneError,
    BackboneMismatchError,
    DuplicateTaskError,
    InvalidNameError,
    RegistryError,
    SchemaVersionError,
    TaskNotFoundError,
)
from ssf_tasks.registry import (
    SCHEMA_VERSION,
    add_backbone,
    add_task_version,
    check_writable,
    default_registry_url,
    get_backbone,
    get_task,
    get_task_payload,
    list_backbones,
    list_task_versions,
    list_tasks,
    open_registry,
    remove_backbone,
    remove_task,
    transaction,
)

FINGERPRINT = registry_workers.FINGERPRINT
OTHER_FINGERPRINT = hashlib.sha256(b"other weights").hexdigest()


def _backbone(name: str = "vit-tiny", fingerprint: str = FINGERPRINT) -> BackboneRecord:
    return BackboneRecord(
        name=name,
        timm_name="vit_tiny_patch16_224",
        weights_source="file:/models/vit_tiny.safetensors",
        fingerprint=fingerprint,
        num_features=192,
        created_at=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=5))),
    )


def _task(name: str = "flowers", **overrides: object) -> TaskRecord:
    fields: dict[str, object] = {
        "name": name,
        "backbone": "vit-tiny",
        "backbone_fingerprint": FINGERPRINT,
        "class_names": ["daisy", "rose", "tulip"],
        "train_config": TrainConfig(epochs=3, lr=0.0123456789, transform="fgvc", patience=2, seed=7),
        "metrics": TaskMetrics(val_top1=0.8125, test_top1=None, epochs_run=3, train_seconds=12.5, best_epoch=2),
        "created_at": datetime(2025, 6, 7, 8, 9, 10, 111213, tzinfo=timezone.utc),
    }
    fields.update(overrides)
    return TaskRecord.model_validate(fields)


_payload = registry_workers.payload  # incompressible, non-UTF-8 bytes of a realistic size, different for every seed


def _add(engine: Engine, record: TaskRecord, payload: bytes, *, new_version: bool = True) -> TaskRecord:
    with Session(engine) as s, s.begin():
        return add_task_version(s, record, payload, new_version=new_version)


def _is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


@pytest.fixture
def url(registry_url: str) -> str:
    """A new registry on SQLite, then on PostgreSQL (see ``registry_url`` in conftest.py)."""
    return registry_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = open_registry(url)
    with Session(engine) as s, s.begin():
        add_backbone(s, _backbone())
    yield engine
    engine.dispose()


# ------------------------------------------------------------------------------------------- backbones


def test_backbone_round_trip(url: str) -> None:
    engine = open_registry(url)
    record = _backbone()
    with Session(engine) as s, s.begin():
        add_backbone(s, record)
        add_backbone(s, _backbone("convnext", OTHER_FINGERPRINT))
    with Session(engine) as s, s.begin():
        assert get_backbone(s, "vit-tiny") == record
        assert [b.name for b in list_backbones(s)] == ["convnext", "vit-tiny"]
    engine.dispose()


def test_backbone_duplicate_and_unknown(engine: Engine) -> None:
    with Session(engine) as s, s.begin():
        with pytest.raises(BackboneError, match="already exists"):
            add_backbone(s, _backbone(fingerprint=OTHER_FINGERPRINT))
        with pytest.raises(BackboneError, match="known backbones: vit-tiny"):
            get_backbone(s, "resnet50")
        assert get_backbone(s, "vit-tiny").fingerprint == FINGERPRINT


def test_remove_backbone_refuses_while_used(engine: Engine) -> None:
    _add(engine, _task(), _payload(0))
    with Session(engine) as s, s.begin():
        with pytest.raises(BackboneError, match="flowers"):
            remove_backbone(s, "vit-tiny")
        remove_task(s, "flowers")
        remove_backbone(s, "vit-tiny")
        assert list_backbones(s) == []


# ----------------------------------------------------------------------------------------------- tasks


def test_task_round_trip(engine: Engine) -> None:
    record, payload = _task(version=42), _payload(1)
    stored = _add(engine, record, payload, new_version=False)
    expected = record.model_copy(update={"version": 1, "payload_sha256": hashlib.sha256(payload).hexdigest()})
    assert stored == expected
    with Session(engine) as s, s.begin():
        assert get_task(s, "flowers") == expected
        assert get_task(s, "flowers", 1) == expected
        assert get_task_payload(s, "flowers", 1) == payload
        assert list_tasks(s) == [expected]


def test_versions_increment_and_latest_wins(engine: Engine) -> None:
    for i in range(3):
        stored = _add(engine, _task(train_config=TrainConfig(epochs=i + 1)), _payload(i), new_version=i > 0)
        assert stored.version == i + 1
    _add(engine, _task("birds"), _payload(9))
    with Session(engine) as s, s.begin():
        latest = get_task(s, "flowers")
        assert (latest.version, latest.train_config.epochs) == (3, 3)
        assert get_task(s, "flowers", 2).train_config.epochs == 2
        assert get_task_payload(s, "flowers") == _payload(2)
        assert get_task_payload(s, "flowers", 1) == _payload(0)
        assert [r.version for r in list_task_versions(s, "flowers")] == [1, 2, 3]
        assert [(r.name, r.version) for r in list_tasks(s)] == [("birds", 1), ("flowers", 3)]


def test_duplicate_without_new_version_changes_nothing(engine: Engine) -> None:
    _add(engine, _task(), _payload(0))
    # The session commits after pytest.raises swallows the error: even so, nothing may have been written.
    with (
        Session(engine) as s,
        s.begin(),
        pytest.raises(DuplicateTaskError, match="already exists.*new_version") as info,
    ):
        add_task_version(s, _task(class_names=["x", "y"]), _payload(1), new_version=False)
    assert info.value.field == "new_version"
    with Session(engine) as s, s.begin():
        assert [r.version for r in list_task_versions(s, "flowers")] == [1]
        assert get_task(s, "flowers").class_names == ["daisy", "rose", "tulip"]
        assert get_task_payload(s, "flowers") == _payload(0)


def test_unknown_task_and_version_messages(engine: Engine) -> None:
    with Session(engine) as s, s.begin(), pytest.raises(TaskNotFoundError, match="no tasks"):
        get_task(s, "flowers")
    _add(engine, _task("flowers"), _payload(0))
    _add(engine, _task("birds"), _payload(1))
    _add(engine, _task("birds"), _payload(2))
    with Session(engine) as s, s.begin():
        with pytest.raises(TaskNotFoundError, match="known tasks: birds, flowers") as info:
            get_task(s, "cars")
        assert isinstance(info.value, KeyError)
        assert str(info.value).startswith("unknown task 'cars'")  # plain text, not KeyError's quoting
        with pytest.raises(TaskNotFoundError, match="versions: 1, 2"):
            get_task(s, "birds", 5)
        with pytest.raises(TaskNotFoundError, match="known tasks"):
            get_task_payload(s, "cars")
        with pytest.raises(TaskNotFoundError, match="known tasks"):
            list_task_versions(s, "cars")


def test_remove(engine: Engine) -> None:
    for i in range(3):
        _add(engine, _task(), _payload(i))
    with Session(engine) as s, s.begin():
        assert remove_task(s, "flowers", 3) == 1
        with pytest.raises(TaskNotFoundError, match="versions: 1, 2"):
            remove_task(s, "flowers", 3)
    # A removed version's number is not handed out again for different weights.
    assert _add(engine, _task(), _payload(7)).version == 4
    with Session(engine) as s, s.begin():
        assert [r.version for r in list_task_versions(s, "flowers")] == [1, 2, 4]
        assert remove_task(s, "flowers") == 3
        with pytest.raises(TaskNotFoundError):
            remove_task(s, "flowers")
        assert list_tasks(s) == []
    # Gone entirely: the name is free again, without --new-version.
    assert _add(engine, _task(), _payload(8), new_version=False).version == 1


def test_removing_last_version_removes_task(engine: Engine) -> None:
    _add(engine, _task(), _payload(0))
    with Session(engine) as s, s.begin():
        assert remove_task(s, "flowers", 1) == 1
        assert list_tasks(s) == []
    assert _add(engine, _task(), _payload(1), new_version=False).version == 1


def test_backbone_must_exist_and_match(engine: Engine) -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'resnet'; known backbones: vit-tiny"):
        _add(engine, _task(backbone="resnet"), _payload(0))
    with pytest.raises(BackboneMismatchError, match="fingerprint"):
        _add(engine, _task(backbone_fingerprint=OTHER_FINGERPRINT), _payload(0))
    with Session(engine) as s, s.begin():
        assert list_tasks(s) == []


def test_payload_hash_checked_on_write_and_read(engine: Engine) -> None:
    with pytest.raises(RegistryError, match="sha256"):
        _add(engine, _task(payload_sha256=hashlib.sha256(b"something else").hexdigest()), _payload(0))
    good = _task(payload_sha256=hashlib.sha256(_payload(0)).hexdigest())
    assert _add(engine, good, _payload(0)).payload_sha256 == good.payload_sha256
    with engine.begin() as conn:
        conn.execute(text("UPDATE task_versions SET payload = :p"), {"p": b"tampered"})
    with Session(engine) as s, s.begin(), pytest.raises(RegistryError, match="corrupt"):
        get_task_payload(s, "flowers", 1)


def test_rolled_back_transaction_leaves_no_version(engine: Engine) -> None:
    _add(engine, _task(), _payload(0))
    with pytest.raises(RuntimeError, match="training crashed"), Session(engine) as s, s.begin():
        add_task_version(s, _task(), _payload(1), new_version=True)
        add_task_version(s, _task("birds"), _payload(2), new_version=False)
        raise RuntimeError("training crashed")
    with Session(engine) as s, s.begin():
        assert [(r.name, r.version) for r in list_tasks(s)] == [("flowers", 1)]
    assert _add(engine, _task(), _payload(3)).version == 2


# ------------------------------------------------------------------------------------ opening, schema


def test_open_creates_the_schema(url: str) -> None:
    engine = open_registry(url)
    with engine.connect() as conn:
        assert sorted(inspect(conn).get_table_names()) == [
            "backbones",
            "schema_info",
            "task_routing",
            "task_versions",
            "tasks",
        ]
        assert conn.execute(text("SELECT id, schema_version FROM schema_info")).all() == [(1, SCHEMA_VERSION)]
    engine.dispose()
    open_registry(url).dispose()  # reopening an existing registry is fine
    engine = open_registry(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id, schema_version FROM schema_info")).all() == [(1, SCHEMA_VERSION)]
    engine.dispose()


def test_sqlite_open_creates_folder_and_uses_wal(tmp_path: Path) -> None:
    engine = open_registry(f"sqlite:///{tmp_path / 'home' / 'registry.db'}")
    assert (tmp_path / "home" / "registry.db").is_file()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_unreachable_server_is_a_registry_error() -> None:
    with pytest.raises(RegistryError, match="Connection refused") as info:
        open_registry("postgresql+psycopg://nobody:secret@127.0.0.1:1/db")
    assert str(info.value).startswith("cannot open registry postgresql+psycopg://nobody:***@127.0.0.1:1/db: ")
    assert "secret" not in str(info.value)


def test_newer_schema_is_refused(url: str) -> None:
    open_registry(url).dispose()
    engine = open_registry(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET schema_version = 99"))
    engine.dispose()
    with pytest.raises(SchemaVersionError) as info:
        open_registry(url)
    message = str(info.value)
    assert "99" in message and str(SCHEMA_VERSION) in message and "upgrade ssf-tasks" in message


def test_unwritable_path_is_a_registry_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(RegistryError) as info:
        open_registry(f"sqlite:///{blocker / 'sub' / 'registry.db'}")
    assert "not-a-folder" in str(info.value) and "\n" not in str(info.value)


def test_not_a_database_is_a_registry_error(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not an sqlite file" * 100)
    with pytest.raises(RegistryError, match="cannot open registry"):
        open_registry(f"sqlite:///{path}")


def test_bad_url_is_a_registry_error() -> None:
    with pytest.raises(RegistryError):
        open_registry("nosuchdialect://x/y")


def test_default_registry_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSF_TASKS_REGISTRY", raising=False)
    monkeypatch.setenv("SSF_TASKS_HOME", str(tmp_path / "h"))
    assert default_registry_url() == f"sqlite:///{tmp_path / 'h' / 'registry.db'}"
    assert (tmp_path / "h").is_dir()
    monkeypatch.setenv("SSF_TASKS_REGISTRY", "postgresql+psycopg://u@host/db")
    assert default_registry_url() == "postgresql+psycopg://u@host/db"


# ----------------------------------------------------------------------------------------- concurrency


def test_two_engines_share_one_database(engine: Engine, url: str) -> None:
    second = open_registry(url)
    _add(engine, _task(), _payload(0))
    assert _add(second, _task(), _payload(1)).version == 2
    with Session(engine) as s, s.begin():
        assert get_task(s, "flowers").version == 2
        assert get_task_payload(s, "flowers", 2) == _payload(1)
    second.dispose()


def test_second_writer_waits_for_the_first(engine: Engine, url: str) -> None:
    # The first writer creates the task and has not committed: the second (SQLite: at BEGIN IMMEDIATE;
    # PostgreSQL: on the new row's unique key) must wait, then add version 2 of the task that now exists.
    second = open_registry(url)
    impatient = open_registry(url, sqlite_busy_timeout=0.1) if _is_sqlite(url) else None
    results: list[int] = []
    with Session(engine) as s, s.begin():
        add_task_version(s, _task(), _payload(0), new_version=False)
        waiter = threading.Thread(target=lambda: results.append(_add(second, _task(), _payload(1)).version))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "the second writer should be waiting for the lock"
        if impatient is not None:
            with pytest.raises(RegistryError, match="locked"):
                _add(impatient, _task(), _payload(2))
            impatient.dispose()
    waiter.join(timeout=10)
    assert results == [2]
    with Session(engine) as s, s.begin():
        assert [(r.version, get_task_payload(s, "flowers", r.version)) for r in list_task_versions(s, "flowers")] == [
            (1, _payload(0)),
            (2, _payload(1)),
        ]
    second.dispose()


_SPAWN = multiprocessing.get_context("spawn")  # a fresh interpreter, as a second ssf-tasks command would be


def _run_processes(
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]], *, stop: Any = None, stop_after: int = 0
) -> list[Any]:
    """Run each ``(target, (url, barrier, *rest))`` as ``target(url, barrier, queue, index, *rest)`` in a process of
    its own and return what each reported, by index; fail with a worker's traceback if one failed.

    With ``stop`` (an Event), it is set as soon as workers ``0 .. stop_after-1`` are done (the writers), so that
    the others (readers polling until it is set) finish too.
    """
    queue = _SPAWN.Queue()
    procs = [_SPAWN.Process(target=target, args=(*a[:2], queue, i, *a[2:])) for i, (target, a) in enumerate(jobs)]
    try:
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        while len(results) < len(procs):
            worker, status, body = queue.get(timeout=60)
            assert status == "ok", f"worker {worker} failed:\n{body}"
            results[worker] = body
            if stop is not None and all(w in results for w in range(stop_after)):
                stop.set()
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        return [results[i] for i in range(len(procs))]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()


def test_concurrent_first_open_creates_the_schema_once(url: str) -> None:
    # Several ssf-tasks commands run for the first time against the same new database: all must open it.
    barrier = _SPAWN.Barrier(3)
    assert _run_processes([(registry_workers.open_only, (url, barrier))] * 3) == [None] * 3
    engine = open_registry(url)
    with engine.connect() as conn:
        assert sorted(inspect(conn).get_table_names()) == [
            "backbones",
            "schema_info",
            "task_routing",
            "task_versions",
            "tasks",
        ]
        assert conn.execute(text("SELECT id, schema_version FROM schema_info")).all() == [(1, SCHEMA_VERSION)]
    engine.dispose()


def test_two_processes_register_the_same_new_name(engine: Engine, url: str) -> None:
    # Both processes try each new name at the same moment, new_version=False, and keep their transaction open a
    # little after writing: for every name exactly one stores version 1, the other gets DuplicateTaskError.
    names = [f"race-{i}" for i in range(4)]
    barrier = _SPAWN.Barrier(2)
    outcomes = _run_processes([(registry_workers.register_new_tasks, (url, barrier, names, 0.15))] * 2)
    winners: dict[str, int] = {}
    for name in names:
        got = sorted((outcomes[w][name], w) for w in range(2))
        (loser_outcome, _), (winner_outcome, winner) = got
        assert winner_outcome == ("stored", 1), got
        assert loser_outcome[0] == "duplicate", got
        assert loser_outcome[1].startswith(f"task '{name}' already exists (latest version 1)")
        assert loser_outcome[2] == "new_version"
        winners[name] = winner
    with Session(engine) as s, s.begin():
        rows = s.execute(text("SELECT name, last_version FROM tasks ORDER BY name")).all()
        assert [tuple(r) for r in rows] == [(name, 1) for name in names]
        rows = s.execute(text("SELECT task_name, version FROM task_versions ORDER BY task_name, version")).all()
        assert [tuple(r) for r in rows] == [(name, 1) for name in names]
        for name, winner in winners.items():
            assert get_task(s, name).class_names == [f"class-{winner}", "other"]
            assert get_task_payload(s, name) == _payload(winner)


def test_concurrent_processes_get_distinct_versions(engine: Engine, url: str) -> None:
    # Four processes add three versions each of a task none of them has yet, all at once (new_version=True):
    # versions 1..12, each with the record and bytes its writer sent, none lost, none twice.
    workers, per_worker = 4, 3
    barrier = _SPAWN.Barrier(workers)
    seeds = [[100 * w + i for i in range(per_worker)] for w in range(workers)]
    results = _run_processes(
        [(registry_workers.add_versions, (url, barrier, "flowers", seeds[w], 0.02)) for w in range(workers)]
    )
    for w, done in enumerate(results):
        assert [seed for _, seed in done] == seeds[w]
        assert [v for v, _ in done] == sorted(v for v, _ in done)  # one writer's versions are in its order
    seed_of = {version: seed for done in results for version, seed in done}
    assert sorted(seed_of) == list(range(1, workers * per_worker + 1))
    with Session(engine) as s, s.begin():
        stored = list_task_versions(s, "flowers")
        assert [r.version for r in stored] == list(range(1, workers * per_worker + 1))
        for record in stored:
            seed = seed_of[record.version]
            assert record.train_config.seed == seed
            assert record.class_names == [f"class-{seed}", "other"]
            assert record.payload_sha256 == hashlib.sha256(_payload(seed)).hexdigest()
            assert get_task_payload(s, "flowers", record.version) == _payload(seed)
        assert s.execute(select(func.count()).select_from(text("task_versions"))).scalar_one() == len(seed_of)
        assert s.execute(text("SELECT last_version FROM tasks WHERE name = 'flowers'")).scalar_one() == len(seed_of)


def test_readers_never_see_a_half_written_version(engine: Engine, url: str) -> None:
    # Two writers add versions (each transaction held open a moment after its write) while two readers poll the
    # versions, payloads, latest version and listing: a reader sees versions 1..k with exactly their bytes, k
    # never going down, and at the end all of them.
    writers, readers, per_writer = 2, 2, 5
    barrier, stop, reads = _SPAWN.Barrier(writers + readers), _SPAWN.Event(), _SPAWN.Value("i", 0)
    seeds = [[1000 * w + i for i in range(per_writer)] for w in range(writers)]
    writing = [
        (registry_workers.add_versions, (url, barrier, "flowers", seeds[w], 0.05, reads)) for w in range(writers)
    ]
    reading = [(registry_workers.poll_task, (url, barrier, "flowers", stop, reads))] * readers
    results = _run_processes(writing + reading, stop=stop, stop_after=writers)
    total = writers * per_writer
    versions = sorted(v for w in range(writers) for v, _ in results[w])
    assert versions == list(range(1, total + 1))
    seen_during_writes: set[int] = set()
    for r in range(writers, writers + readers):
        report = results[r]
        assert report["problems"] == [], report
        assert report["final"] == total
        seen_during_writes.update(c for c in report["counts"] if 0 < c < total)
    assert seen_during_writes, f"the readers never read while the writers were writing: {results}"
    with Session(engine) as s, s.begin():
        assert [r.version for r in list_task_versions(s, "flowers")] == list(range(1, total + 1))


# ------------------------------------------------------------------------------------- names, models


@pytest.mark.parametrize("name", ["", "Flowers", "-flowers", ".hidden", "a b", "a/b", "é", "x" * 65, "a\n"])
def test_invalid_names(name: str, engine: Engine) -> None:
    with pytest.raises(InvalidNameError, match="invalid task name"):
        validate_name("task", name)
    with Session(engine) as s, s.begin():
        with pytest.raises(InvalidNameError):
            get_task(s, name)
        with pytest.raises(InvalidNameError, match="invalid backbone name"):
            get_backbone(s, name)
    with pytest.raises(ValidationError, match="invalid task name"):
        _task(name)
    with pytest.raises(ValidationError, match="invalid backbone name"):
        _backbone(name)


@pytest.mark.parametrize("name", ["a", "flowers-102", "cub_200.v2", "0", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_name("task", name) == name


def test_models_forbid_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"learning_rate": 0.1})
    with pytest.raises(ValidationError):
        TrainConfig(lr=0)
    with pytest.raises(ValidationError):
        _task(class_names=[])
    with pytest.raises(ValidationError, match="unique"):
        _task(class_names=["a", "b", "a"])
    with pytest.raises(ValidationError):
        _task(backbone_fingerprint="not-a-sha")


def test_task_file_round_trip() -> None:
    record = _task(payload_sha256=hashlib.sha256(b"p").hexdigest())
    file = TaskFile.from_record(record)
    assert file.format_version == 1
    assert TaskFile.model_validate_json(file.model_dump_json()).to_record() == record
    with pytest.raises(ValidationError, match="upgrade ssf-tasks"):
        TaskFile.model_validate({**file.model_dump(mode="json"), "format_version": 2})


def test_naive_datetimes_are_local_time_normalised_to_utc() -> None:
    naive = datetime(2025, 1, 1, 12, 0, 0)
    record = _task(created_at=naive)
    assert record.created_at.tzinfo == timezone.utc
    assert record.created_at == naive.astimezone(timezone.utc)


def test_missing_database_driver_is_a_registry_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # A URL whose dialect exists but whose driver package is not installed used to escape as ImportError.
    import builtins

    real_import = builtins.__import__

    def no_pg8000(name: str, *args: object, **kwargs: object) -> object:
        if name == "pg8000":
            raise ModuleNotFoundError("No module named 'pg8000'", name="pg8000")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pg8000)
    with pytest.raises(RegistryError, match="driver is not installed"):
        open_registry("postgresql+pg8000://user@127.0.0.1:1/db")


def test_invalid_rows_are_registry_errors_naming_the_row(engine: Engine) -> None:
    _add(engine, _task(), _payload(0))
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.execute(text("UPDATE task_versions SET train_config = json_set(train_config, '$.bogus', 1)"))
        else:
            conn.execute(
                text("""UPDATE task_versions SET train_config = (train_config::jsonb || '{"bogus": 1}')::json""")
            )
        conn.execute(text("UPDATE backbones SET fingerprint = 'not-a-sha'"))
    with Session(engine) as s:
        with pytest.raises(RegistryError, match=r"task 'flowers' version 1 is invalid: bogus"):
            list_tasks(s)
        with pytest.raises(RegistryError, match=r"backbone 'vit-tiny' is invalid: fingerprint"):
            list_backbones(s)


def test_check_writable_refuses_a_read_only_registry(engine: Engine, url: str) -> None:
    with Session(engine) as s:
        check_writable(s)  # a writable registry passes, and nothing is kept
    if _is_sqlite(url):
        path = url.removeprefix("sqlite:///")
        read_only_url = f"sqlite:///file:{path}?mode=ro&uri=true"
    else:  # as on a hot standby, which refuses every write
        options = {"options": "-c default_transaction_read_only=on"}
        read_only_url = make_url(url).update_query_dict(options).render_as_string(hide_password=False)
    read_only = open_registry(read_only_url)
    try:
        with Session(read_only) as s, pytest.raises(RegistryError, match="read-?only"):
            check_writable(s)
        with Session(read_only) as s:
            assert [b.name for b in list_backbones(s)] == ["vit-tiny"]  # reading still works
    finally:
        read_only.dispose()
    with Session(engine) as s:
        assert s.execute(text("SELECT id, schema_version FROM schema_info")).all() == [(1, SCHEMA_VERSION)]


def test_transaction_turns_a_failed_commit_into_a_registry_error(engine: Engine) -> None:
    import sqlite3

    from sqlalchemy import event
    from sqlalchemy.exc import OperationalError

    def disk_full(_conn: object) -> None:
        raise OperationalError("COMMIT", {}, sqlite3.OperationalError("database or disk is full"))

    event.listen(engine, "commit", disk_full)
    try:
        with pytest.raises(RegistryError, match="storing task 'flowers': database or disk is full"):
            with transaction(engine, "storing task 'flowers'") as s:
                add_task_version(s, _task(), _payload(0), new_version=False)
    finally:
        event.remove(engine, "commit", disk_full)
    with Session(engine) as s:
        assert list_tasks(s) == []
