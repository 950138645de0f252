"""The registry on real SQLite files: round trips, versioning, errors, transactions and concurrent writers."""

from __future__ import annotations

import hashlib
import multiprocessing
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import Engine, text
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

FINGERPRINT = hashlib.sha256(b"vit-tiny weights").hexdigest()
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


def _payload(seed: int) -> bytes:
    # Incompressible, non-UTF-8 bytes of a realistic size, different for every seed.
    return b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(4096))


def _add(engine: Engine, record: TaskRecord, payload: bytes, *, new_version: bool = True) -> TaskRecord:
    with Session(engine) as s, s.begin():
        return add_task_version(s, record, payload, new_version=new_version)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'home' / 'registry.db'}"


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
    with Session(engine) as s, s.begin(), pytest.raises(DuplicateTaskError, match="--new-version"):
        add_task_version(s, _task(class_names=["x", "y"]), _payload(1), new_version=False)
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


def test_open_creates_folder_and_uses_wal(url: str, tmp_path: Path) -> None:
    engine = open_registry(url)
    assert (tmp_path / "home" / "registry.db").is_file()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.execute(text("SELECT schema_version FROM schema_info")).scalar_one() == SCHEMA_VERSION
    engine.dispose()
    open_registry(url).dispose()  # reopening an existing registry is fine


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


def test_two_engines_share_one_file(engine: Engine, url: str) -> None:
    second = open_registry(url)
    _add(engine, _task(), _payload(0))
    assert _add(second, _task(), _payload(1)).version == 2
    with Session(engine) as s, s.begin():
        assert get_task(s, "flowers").version == 2
        assert get_task_payload(s, "flowers", 2) == _payload(1)
    second.dispose()


def test_second_writer_waits_for_the_first(engine: Engine, url: str) -> None:
    second = open_registry(url)
    impatient = open_registry(url, sqlite_busy_timeout=0.1)
    results: list[int] = []
    with Session(engine) as s, s.begin():
        add_task_version(s, _task(), _payload(0), new_version=False)
        waiter = threading.Thread(target=lambda: results.append(_add(second, _task(), _payload(1)).version))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "the second writer should be waiting for the lock"
        with pytest.raises(RegistryError, match="locked"):
            _add(impatient, _task(), _payload(2))
    waiter.join(timeout=10)
    assert results == [2]
    second.dispose()
    impatient.dispose()


def _add_versions_in_subprocess(url: str, barrier: object, queue: object, worker: int) -> None:
    engine = open_registry(url)
    barrier.wait()  # type: ignore[attr-defined]
    versions = [_add(engine, _task(), _payload(100 * worker + i)).version for i in range(5)]
    queue.put((worker, versions))  # type: ignore[attr-defined]
    engine.dispose()


def test_concurrent_processes_get_distinct_versions(engine: Engine, url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_add_versions_in_subprocess, args=(url, barrier, queue, w)) for w in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    versions = results[0] + results[1]
    assert sorted(versions) == list(range(1, 11))
    assert all(v == sorted(v) for v in results.values())
    with Session(engine) as s, s.begin():
        stored = list_task_versions(s, "flowers")
        assert [r.version for r in stored] == list(range(1, 11))
        # Each version holds the payload its writer sent with it.
        for worker, worker_versions in results.items():
            for i, version in enumerate(worker_versions):
                assert get_task_payload(s, "flowers", version) == _payload(100 * worker + i)


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
        conn.execute(text("UPDATE task_versions SET train_config = json_set(train_config, '$.bogus', 1)"))
        conn.execute(text("UPDATE backbones SET fingerprint = 'not-a-sha'"))
    with Session(engine) as s:
        with pytest.raises(RegistryError, match=r"task 'flowers' version 1 is invalid: bogus"):
            list_tasks(s)
        with pytest.raises(RegistryError, match=r"backbone 'vit-tiny' is invalid: fingerprint"):
            list_backbones(s)


def test_check_writable_refuses_a_read_only_registry(engine: Engine, url: str) -> None:
    with Session(engine) as s:
        check_writable(s)  # a writable registry passes, and nothing is kept
    path = url.removeprefix("sqlite:///")
    read_only = open_registry(f"sqlite:///file:{path}?mode=ro&uri=true")
    try:
        with Session(read_only) as s, pytest.raises(RegistryError, match="readonly"):
            check_writable(s)
    finally:
        read_only.dispose()


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
