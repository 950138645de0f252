"""The task registry: backbones and versioned tasks in any SQL database SQLAlchemy can reach.

This is the only module that knows SQL. Everything goes in and comes out as the pydantic records of
``config.py``; the ORM rows never leave this file.

Functions take a ``Session`` and never commit: the caller owns the transaction::

    engine = open_registry(default_registry_url())
    with Session(engine) as s, s.begin():
        add_task_version(s, record, payload, new_version=True)

A task version becomes visible to other readers only when that transaction commits. Training writes its
result in one such transaction at the very end, so a run that crashes or is interrupted leaves nothing
half-written behind, and nobody ever loads a task whose training has not finished.

SQLite (the default, one file under ``~/.ssf-tasks``) is set up for several processes on one machine: WAL
journal, a busy timeout so a second writer waits instead of failing, and ``BEGIN IMMEDIATE`` so that a
transaction that reads before it writes (as adding a version does) cannot lose the race for the write lock
half-way. For several machines, point ``SSF_TASKS_REGISTRY`` at a server database such as PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Engine,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from ssf_tasks.config import BackboneRecord, TaskMetrics, TaskRecord, TrainConfig, validate_name
from ssf_tasks.errors import (
    BackboneError,
    BackboneMismatchError,
    DuplicateTaskError,
    RegistryError,
    SchemaVersionError,
    SSFTasksError,
    TaskNotFoundError,
)

__all__ = [
    "SCHEMA_VERSION",
    "add_backbone",
    "add_task_version",
    "check_backbone_addable",
    "check_task_addable",
    "check_writable",
    "default_registry_url",
    "get_backbone",
    "get_task",
    "get_task_payload",
    "get_task_routing",
    "set_task_routing",
    "list_backbones",
    "list_task_versions",
    "list_tasks",
    "open_registry",
    "remove_backbone",
    "remove_task",
    "transaction",
]

SCHEMA_VERSION = 2
"""Version of the table layout below; bump it (and add a migration) whenever the layout changes.

2 added ``task_routing`` (created on opening a version-1 registry; an ssf-tasks that knows only version 1 would
leave a removed task's routing entry behind, so it refuses a version-2 registry)."""

_NAME = String(64)
_SHA256 = String(64)


# --------------------------------------------------------------------------------------------------- ORM


class _UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as naive UTC and read back as aware UTC.

    SQLite and ``TIMESTAMP WITHOUT TIME ZONE`` drop the zone; normalising on both sides makes a record
    read back compare equal to the one written, on every backend.
    """

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class _Base(DeclarativeBase):
    pass


class _SchemaInfo(_Base):
    """A single row saying which table layout this database has, so an older ssf-tasks refuses it."""

    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    schema_version: Mapped[int] = mapped_column(Integer)


class _BackboneRow(_Base):
    __tablename__ = "backbones"

    name: Mapped[str] = mapped_column(_NAME, primary_key=True)
    timm_name: Mapped[str] = mapped_column(String(255))
    weights_source: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(_SHA256)
    num_features: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime)


class _TaskRow(_Base):
    """One row per task name; it is the row that concurrent writers of new versions lock.

    ``last_version`` is the highest version ever issued, so the number of a removed version is never
    reused for different weights.
    """

    __tablename__ = "tasks"

    name: Mapped[str] = mapped_column(_NAME, primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime)


class _TaskVersionRow(_Base):
    __tablename__ = "task_versions"
    __table_args__ = (UniqueConstraint("task_name", "version", name="uq_task_versions_task_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(_NAME, ForeignKey("tasks.name", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    backbone_name: Mapped[str] = mapped_column(_NAME, ForeignKey("backbones.name"))
    backbone_fingerprint: Mapped[str] = mapped_column(_SHA256)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    train_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Deferred: listing tasks must not pull every task's weights out of the database.
    payload: Mapped[bytes] = mapped_column(
        LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), deferred=True
    )
    payload_sha256: Mapped[str] = mapped_column(_SHA256)
    created_at: Mapped[datetime] = mapped_column(_UTCDateTime)


class _TaskRoutingRow(_Base):
    """A task version's routing entry (see :mod:`ssf_tasks.routing`): safetensors bytes, removed with the version."""

    __tablename__ = "task_routing"
    __table_args__ = (UniqueConstraint("task_name", "version", name="uq_task_routing_task_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(_NAME, index=True)
    version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"))
    payload_sha256: Mapped[str] = mapped_column(_SHA256)


# ------------------------------------------------------------------------------------------- opening


def default_registry_url() -> str:
    """The registry to use when none is named.

    ``$SSF_TASKS_REGISTRY`` if set (any SQLAlchemy URL), else an SQLite file ``registry.db`` in
    ``$SSF_TASKS_HOME`` (default ``~/.ssf-tasks``), whose folder is created here.

    Raises:
        RegistryError: If the home folder cannot be created.
    """
    url = os.environ.get("SSF_TASKS_REGISTRY")
    if url:
        return url
    home = Path(os.environ.get("SSF_TASKS_HOME") or "~/.ssf-tasks").expanduser().resolve()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(f"cannot create the ssf-tasks home folder {home}: {e.strerror or e}") from e
    return f"sqlite:///{home / 'registry.db'}"


def open_registry(url: str, *, sqlite_busy_timeout: float = 30.0) -> Engine:
    """Connect to a registry, creating its tables if the database is new.

    Args:
        url: Any SQLAlchemy URL, e.g. ``sqlite:////abs/path/registry.db`` or
            ``postgresql+psycopg://user@host/db``.
        sqlite_busy_timeout: Seconds an SQLite writer waits for another process's write to finish before
            giving up with a ``RegistryError``.

    Returns:
        An engine; use it as ``with Session(engine) as s, s.begin(): ...``.

    Raises:
        SchemaVersionError: If the database was written by a newer ssf-tasks.
        RegistryError: If the database cannot be reached, created or written.
    """
    try:
        parsed = make_url(url)
    except SQLAlchemyError as e:
        raise RegistryError(f"invalid registry URL {url!r}: {e}") from e
    shown = parsed.render_as_string(hide_password=True)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        _make_sqlite_folder(parsed, shown)
    try:
        engine = create_engine(parsed)
    except SQLAlchemyError as e:  # unknown dialect, bad arguments
        raise RegistryError(f"cannot use registry {shown}: {e}") from e
    except ImportError as e:  # the dialect's driver is not installed (e.g. postgresql:// without psycopg)
        raise RegistryError(f"cannot use registry {shown}: its database driver is not installed ({e.name or e})") from e
    if is_sqlite:
        _configure_sqlite(engine, sqlite_busy_timeout)
    try:
        _ensure_schema(engine)
    except SchemaVersionError:
        engine.dispose()
        raise
    except (SQLAlchemyError, OSError) as e:
        engine.dispose()
        raise RegistryError(f"cannot open registry {shown}: {_reason(e)}") from e
    return engine


def _make_sqlite_folder(url: URL, shown: str) -> None:
    # SQLite reports a missing folder as "unable to open database file"; create it, or say what is wrong.
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    folder = Path(database).expanduser().absolute().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(f"cannot create the folder of registry {shown}: {e.strerror or e}") from e


def _configure_sqlite(engine: Engine, busy_timeout: float) -> None:
    """Make SQLite safe for several processes sharing one file."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, issue BEGIN (see _on_begin); this also makes SAVEPOINT work.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # Busy timeout first: switching to WAL itself needs the lock another process may hold.
            cursor.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # A deferred transaction that reads and then writes gets SQLITE_BUSY at once (no waiting) if another
        # process wrote in between. Taking the write lock up front makes it wait on the busy timeout instead.
        connection.exec_driver_sql("BEGIN IMMEDIATE")


_SCHEMA_LOCK_KEY = 0x55F7A5C5
"""PostgreSQL advisory lock key taken while checking and creating the tables (advisory locks are per database)."""


def _ensure_schema(engine: Engine) -> None:
    # One transaction: two processes opening a new registry at once must not both create it.
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # PostgreSQL's CREATE TABLE is transactional but does not wait for a concurrent one: the second
            # creator fails on the catalog's unique index ("pg_type_typname_nsp_index") once the first commits.
            # Serialise first opens on a lock of this database, released when this transaction ends.
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK_KEY)))
        if inspect(conn).has_table(_SchemaInfo.__tablename__):
            found = conn.execute(select(_SchemaInfo.schema_version)).scalar_one_or_none()
            if found is not None and found > SCHEMA_VERSION:
                raise SchemaVersionError(
                    f"the registry has schema version {found}, but this ssf-tasks knows only up to "
                    f"{SCHEMA_VERSION}: upgrade ssf-tasks"
                )
            if found is not None and found < 1:
                raise SchemaVersionError(f"the registry has an unknown schema version {found}")
        _Base.metadata.create_all(conn)  # also the migration from version 1: it only adds a table
        found = conn.execute(select(_SchemaInfo.schema_version)).scalar_one_or_none()
        if found is None:
            conn.execute(insert(_SchemaInfo).values(id=1, schema_version=SCHEMA_VERSION))
        elif found < SCHEMA_VERSION:
            conn.execute(update(_SchemaInfo).values(schema_version=SCHEMA_VERSION))


def _reason(error: BaseException) -> str:
    # The driver's own message ("database is locked", "attempt to write a readonly database") is the useful
    # part; SQLAlchemy's wrapper adds the SQL statement and a link, which a user does not need.
    if isinstance(error, DBAPIError) and error.orig is not None:
        return str(error.orig)
    return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextmanager
def _db_errors(action: str) -> Iterator[None]:
    """Turn database failures (locked, unreachable, read-only ...) into a one-line RegistryError."""
    try:
        yield
    except SSFTasksError:
        raise
    except DBAPIError as e:
        raise RegistryError(f"registry error while {action}: {_reason(e)}") from e


@contextmanager
def transaction(engine: Engine, action: str) -> Iterator[Session]:
    """``with Session(engine) as s, s.begin(): ...`` whose failures, the commit's included, are RegistryErrors.

    The registry functions below turn the errors of their own statements into :class:`RegistryError`, but the
    commit runs after they return: a full disk, a lost server connection or a lock timeout surfaces there.

    Args:
        engine: The registry.
        action: What the transaction does, for the message (e.g. ``"storing task 'cats'"``).
    """
    with _db_errors(action), Session(engine) as s, s.begin():
        yield s


def check_writable(s: Session) -> None:
    """Fail now, not after an hour of training, if the registry cannot be written (read-only file or user).

    Writes a no-op update; the caller rolls the transaction back (closing the session without commit does).

    Raises:
        RegistryError: The database refuses the write.
    """
    with _db_errors("checking that the registry can be written"):
        s.execute(update(_SchemaInfo).where(_SchemaInfo.id == 1).values(schema_version=_SchemaInfo.schema_version))


# ------------------------------------------------------------------------------------------ backbones


def _invalid_row(what: str, error: ValidationError) -> RegistryError:
    # A row edited by hand or written by another tool: say which row, not just which pydantic field.
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "record"
    return RegistryError(f"the registry's record of {what} is invalid: {where}: {first['msg']}")


def _backbone_record(row: _BackboneRow) -> BackboneRecord:
    try:
        return BackboneRecord.model_validate(row, from_attributes=True)  # the row's columns are the fields
    except ValidationError as e:
        raise _invalid_row(f"backbone '{row.name}'", e) from e


def _unknown_backbone(s: Session, name: str) -> BackboneError:
    known = s.scalars(select(_BackboneRow.name).order_by(_BackboneRow.name)).all()
    listing = f"known backbones: {', '.join(known)}" if known else "no backbone is registered yet"
    return BackboneError(f"unknown backbone '{name}'; {listing}")


def add_backbone(s: Session, record: BackboneRecord) -> None:
    """Register a backbone under a new name.

    Raises:
        BackboneError: If the name is already taken (names are never silently re-pointed at other weights,
            since tasks trained on the old weights would then be misread).
    """
    validate_name("backbone", record.name)
    with _db_errors(f"adding backbone '{record.name}'"):
        if s.get(_BackboneRow, record.name) is not None:
            raise BackboneError(f"backbone '{record.name}' already exists")
        row = _BackboneRow(**record.model_dump())
        try:
            with s.begin_nested():  # a concurrent writer may have taken the name since the check above
                s.add(row)
        except IntegrityError as e:
            raise BackboneError(f"backbone '{record.name}' already exists") from e


def get_backbone(s: Session, name: str) -> BackboneRecord:
    """The backbone registered under ``name``.

    Raises:
        BackboneError: If there is none; the message lists the known names.
    """
    validate_name("backbone", name)
    with _db_errors(f"reading backbone '{name}'"):
        row = s.get(_BackboneRow, name)
        if row is None:
            raise _unknown_backbone(s, name)
        return _backbone_record(row)


def list_backbones(s: Session) -> list[BackboneRecord]:
    """All registered backbones, sorted by name."""
    with _db_errors("listing backbones"):
        return [_backbone_record(r) for r in s.scalars(select(_BackboneRow).order_by(_BackboneRow.name))]


def remove_backbone(s: Session, name: str) -> None:
    """Unregister a backbone that no task uses.

    Raises:
        BackboneError: If it is unknown, or tasks still use it (the message names them).
    """
    validate_name("backbone", name)
    with _db_errors(f"removing backbone '{name}'"):
        if s.get(_BackboneRow, name) is None:
            raise _unknown_backbone(s, name)
        users = s.scalars(
            select(_TaskVersionRow.task_name)
            .where(_TaskVersionRow.backbone_name == name)
            .distinct()
            .order_by(_TaskVersionRow.task_name)
        ).all()
        if users:
            raise BackboneError(f"backbone '{name}' is used by tasks {', '.join(users)}; remove them first")
        s.execute(delete(_BackboneRow).where(_BackboneRow.name == name))


# ---------------------------------------------------------------------------------------------- tasks


def _task_record(row: _TaskVersionRow) -> TaskRecord:
    try:
        return TaskRecord(
            name=row.task_name,
            version=row.version,
            backbone=row.backbone_name,
            backbone_fingerprint=row.backbone_fingerprint,
            class_names=list(row.class_names),
            train_config=TrainConfig.model_validate(row.train_config),
            metrics=TaskMetrics.model_validate(row.metrics),
            payload_sha256=row.payload_sha256,
            created_at=row.created_at,
        )
    except ValidationError as e:
        raise _invalid_row(f"task '{row.task_name}' version {row.version}", e) from e


def _unknown_task(s: Session, name: str) -> TaskNotFoundError:
    known = s.scalars(select(_TaskRow.name).order_by(_TaskRow.name)).all()
    listing = f"known tasks: {', '.join(known)}" if known else "the registry has no tasks yet"
    return TaskNotFoundError(f"unknown task '{name}'; {listing}")


def _versions_of(s: Session, name: str) -> list[int]:
    return list(
        s.scalars(
            select(_TaskVersionRow.version).where(_TaskVersionRow.task_name == name).order_by(_TaskVersionRow.version)
        )
    )


def _version_row(s: Session, name: str, version: int | None) -> _TaskVersionRow:
    query = select(_TaskVersionRow).where(_TaskVersionRow.task_name == name)
    if version is None:
        query = query.order_by(_TaskVersionRow.version.desc()).limit(1)
    else:
        query = query.where(_TaskVersionRow.version == version)
    row = s.scalars(query).first()
    if row is not None:
        return row
    versions = _versions_of(s, name)
    if not versions:
        raise _unknown_task(s, name)
    raise TaskNotFoundError(f"task '{name}' has no version {version}; its versions: {', '.join(map(str, versions))}")


def add_task_version(s: Session, record: TaskRecord, payload: bytes, *, new_version: bool) -> TaskRecord:
    """Store a trained task (its record and its γ/β + head safetensors bytes) as a new version.

    The version number is assigned here: one more than the highest this task ever had (1 for a new task);
    ``record.version`` is ignored. Concurrent writers are serialised on the task's row, so two processes
    can never get the same number.

    Args:
        s: A session inside the caller's transaction; nothing is visible to others until it commits.
        record: The task's metadata. ``payload_sha256`` may be empty; if given it must match ``payload``.
        payload: The task's tensors as safetensors bytes.
        new_version: Whether adding to an existing task is intended. Without it an existing name is an
            error, so a typo cannot silently bury someone else's task under a new version.

    Returns:
        The record as stored, with its version and payload hash.

    Raises:
        DuplicateTaskError: If the task exists and ``new_version`` is false.
        BackboneError: If the backbone is not registered.
        BackboneMismatchError: If the record's backbone fingerprint differs from the registered one.
        RegistryError: If the payload does not match ``payload_sha256``, or the database fails.
    """
    validate_name("task", record.name)
    validate_name("backbone", record.backbone)
    digest = hashlib.sha256(payload).hexdigest()
    if record.payload_sha256 and record.payload_sha256 != digest:
        raise RegistryError(
            f"payload of task '{record.name}' does not match its sha256 "
            f"({digest[:12]}... != {record.payload_sha256[:12]}...); refusing to store it"
        )
    with _db_errors(f"adding a version of task '{record.name}'"):
        backbone = s.get(_BackboneRow, record.backbone)
        if backbone is None:
            raise _unknown_backbone(s, record.backbone)
        if backbone.fingerprint != record.backbone_fingerprint:
            raise BackboneMismatchError(
                f"task '{record.name}' was trained on weights with fingerprint "
                f"{record.backbone_fingerprint[:12]}..., but backbone '{record.backbone}' is registered "
                f"with {backbone.fingerprint[:12]}..."
            )
        task = _lock_or_create_task(s, record.name, new_version=new_version)
        task.last_version += 1
        row = _TaskVersionRow(
            task_name=record.name,
            version=task.last_version,
            backbone_name=record.backbone,
            backbone_fingerprint=record.backbone_fingerprint,
            class_names=list(record.class_names),
            train_config=record.train_config.model_dump(mode="json"),
            metrics=record.metrics.model_dump(mode="json"),
            payload=bytes(payload),
            payload_sha256=digest,
            created_at=record.created_at,
        )
        try:
            with s.begin_nested():
                s.add(row)
        except IntegrityError as e:
            raise RegistryError(
                f"another process added version {row.version} of task '{record.name}' at the same time; try again"
            ) from e
        return _task_record(row)


def _lock_or_create_task(s: Session, name: str, *, new_version: bool) -> _TaskRow:
    """The task's row, locked for this transaction; created (with no versions yet) if it is new."""
    locked = select(_TaskRow).where(_TaskRow.name == name).with_for_update()
    task = s.scalars(locked).first()
    if task is None:
        try:
            with s.begin_nested():
                task = _TaskRow(name=name, last_version=0, created_at=datetime.now(timezone.utc))
                s.add(task)
            return task
        except IntegrityError:
            # Another process created it between our look and our insert; it exists now, so lock it.
            task = s.scalars(locked).one()
    if not new_version:
        raise _duplicate_task(name, task.last_version)
    return task


def _duplicate_task(name: str, last_version: int) -> DuplicateTaskError:
    return DuplicateTaskError(
        f"task '{name}' already exists (latest version {last_version}); "
        "set new_version to add a version, or choose another name",
        field="new_version",
    )


def check_task_addable(s: Session, name: str, *, new_version: bool) -> None:
    """Raise now what ``add_task_version`` would raise at the end for ``name``: fail before training, not after.

    Raises:
        DuplicateTaskError: The task exists and ``new_version`` is false.
    """
    validate_name("task", name)
    if new_version:
        return
    with _db_errors(f"looking up task '{name}'"):
        last = s.scalars(select(_TaskRow.last_version).where(_TaskRow.name == name)).first()
    if last is not None:
        raise _duplicate_task(name, last)


def check_backbone_addable(s: Session, name: str) -> None:
    """Raise now what ``add_backbone`` would raise for ``name``, before its weights are loaded and hashed.

    Raises:
        BackboneError: The name is taken.
    """
    validate_name("backbone", name)
    with _db_errors(f"looking up backbone '{name}'"):
        if s.get(_BackboneRow, name) is not None:
            raise BackboneError(f"backbone '{name}' already exists")


def get_task(s: Session, name: str, version: int | None = None) -> TaskRecord:
    """One version of a task (the latest when ``version`` is None).

    Raises:
        TaskNotFoundError: If the task is unknown (the message lists known tasks) or has no such version
            (the message lists its versions).
    """
    validate_name("task", name)
    with _db_errors(f"reading task '{name}'"):
        return _task_record(_version_row(s, name, version))


def get_task_payload(s: Session, name: str, version: int | None = None) -> bytes:
    """The γ/β + head safetensors bytes of one task version (the latest when ``version`` is None).

    Pass the version of the record you already read, so record and payload are sure to belong together.

    Raises:
        TaskNotFoundError: If the task or version is unknown.
        RegistryError: If the stored bytes do not match their sha256 (a corrupt registry).
    """
    validate_name("task", name)
    with _db_errors(f"reading the payload of task '{name}'"):
        row = _version_row(s, name, version)
        payload = row.payload
        if hashlib.sha256(payload).hexdigest() != row.payload_sha256:
            raise RegistryError(
                f"task '{name}' version {row.version} is corrupt: its payload does not match its sha256"
            )
        return payload


def list_tasks(s: Session) -> list[TaskRecord]:
    """The latest version of every task, sorted by name."""
    with _db_errors("listing tasks"):
        latest = (
            select(_TaskVersionRow.task_name, func.max(_TaskVersionRow.version).label("version"))
            .group_by(_TaskVersionRow.task_name)
            .subquery()
        )
        rows = s.scalars(
            select(_TaskVersionRow)
            .join(
                latest,
                (_TaskVersionRow.task_name == latest.c.task_name) & (_TaskVersionRow.version == latest.c.version),
            )
            .order_by(_TaskVersionRow.task_name)
        )
        return [_task_record(r) for r in rows]


def list_task_versions(s: Session, name: str) -> list[TaskRecord]:
    """Every stored version of one task, oldest first.

    Raises:
        TaskNotFoundError: If the task is unknown.
    """
    validate_name("task", name)
    with _db_errors(f"listing versions of task '{name}'"):
        rows = s.scalars(
            select(_TaskVersionRow).where(_TaskVersionRow.task_name == name).order_by(_TaskVersionRow.version)
        ).all()
        if not rows:
            raise _unknown_task(s, name)
        return [_task_record(r) for r in rows]


def remove_task(s: Session, name: str, version: int | None = None) -> int:
    """Remove one version of a task, or the whole task when ``version`` is None.

    Removing a task's last remaining version removes the task, so its name can be used afresh.

    Returns:
        How many versions were removed.

    Raises:
        TaskNotFoundError: If the task or version is unknown.
    """
    validate_name("task", name)
    with _db_errors(f"removing task '{name}'"):
        task = s.scalars(select(_TaskRow).where(_TaskRow.name == name).with_for_update()).first()
        if task is None:
            raise _unknown_task(s, name)
        versions = _versions_of(s, name)
        if version is not None and version not in versions:
            raise TaskNotFoundError(
                f"task '{name}' has no version {version}; its versions: {', '.join(map(str, versions))}"
            )
        doomed = versions if version is None else [version]
        s.execute(delete(_TaskVersionRow).where(_TaskVersionRow.task_name == name, _TaskVersionRow.version.in_(doomed)))
        s.execute(delete(_TaskRoutingRow).where(_TaskRoutingRow.task_name == name, _TaskRoutingRow.version.in_(doomed)))
        if len(doomed) == len(versions):
            s.delete(task)
        s.flush()
        return len(doomed)


def set_task_routing(s: Session, name: str, version: int, payload: bytes) -> None:
    """Store (or replace) the routing entry of one stored task version, in the caller's transaction.

    Raises:
        TaskNotFoundError: If the task or version is unknown.
    """
    validate_name("task", name)
    with _db_errors(f"storing the routing entry of task '{name}'"):
        _version_row(s, name, version)
        s.execute(delete(_TaskRoutingRow).where(_TaskRoutingRow.task_name == name, _TaskRoutingRow.version == version))
        digest = hashlib.sha256(payload).hexdigest()
        s.add(_TaskRoutingRow(task_name=name, version=version, payload=bytes(payload), payload_sha256=digest))
        s.flush()


def get_task_routing(s: Session, versions: dict[str, int]) -> dict[str, bytes]:
    """The routing entries of the given task versions (name -> version); tasks without one are left out.

    Raises:
        RegistryError: If stored bytes do not match their sha256 (a corrupt registry).
    """
    if not versions:
        return {}
    with _db_errors("reading routing entries"):
        rows = s.scalars(select(_TaskRoutingRow).where(_TaskRoutingRow.task_name.in_(list(versions))))
        found: dict[str, bytes] = {}
        for row in rows:
            if versions.get(row.task_name) != row.version:
                continue
            if hashlib.sha256(row.payload).hexdigest() != row.payload_sha256:
                raise RegistryError(
                    f"task '{row.task_name}' version {row.version} is corrupt: its routing entry does not match "
                    "its sha256"
                )
            found[row.task_name] = row.payload
        return found
