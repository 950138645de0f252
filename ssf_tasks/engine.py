"""The inference engine: stored tasks loaded once, mixed-task batches run fast, kept in step with the registry.

A :class:`Predictor` owns, per backbone, one :class:`~ssf_tasks.model.MultiTaskSSF` holding every loaded task, its
forward (compiled per batch-size bucket on CUDA), and the input path of :mod:`ssf_tasks.image_input`. ``predict``,
``task eval``, ``export``, the server and the benchmarks all go through it; nothing else groups, pads or compiles.

Continual adaptation: :meth:`Predictor.refresh` loads tasks registered (or versioned) since, and drops removed ones.
Each model keeps spare rows in its tables: a new task is written into one in place, so the compiled forwards serve it
at once with no new graph, while running batches, which index other rows, go on undisturbed. A removed or replaced
task's row is retired and becomes spare again only once no batch that may read it is running. Without a spare row
(or with more classes than the heads have columns) the new tasks are loaded on a copy of the model, compiled and
warmed beside the serving one, which it then replaces in one assignment. Either way the other tasks' rows and the
frozen backbone are untouched, so their answers do not change.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from . import registry
from .catalog import data_config, eval_transform, load_backbone
from .config import BackboneRecord, TaskRecord, validate_name
from .data import IMAGE_EXTENSIONS, ImageDataset, ImageSample, load_splits
from .errors import BackboneMismatchError, DataError, TaskNotFoundError
from .image_input import ImageSource, InputStage, ThreadDecoder, decode_threads, iter_batches, split_transform
from .model import MultiTaskSSF
from .routing import (
    AUTO_TASK,
    DEFAULT_METHOD,
    NO_TASK,
    Router,
    RoutingEntry,
    RoutingMethod,
    entry_from_payload,
    feature_layer,
    pooled_features,
)
from .taskfiles import task_tensors
from .train import evaluate, resolve_device

__all__ = [
    "COMPILE_MIN_BATCHES",
    "Answer",
    "DecodeMode",
    "PRECISIONS",
    "LoadedTasks",
    "Precision",
    "Prediction",
    "Predictor",
    "Prepared",
    "TaskCatalog",
    "evaluate_task",
    "folder_items",
    "load_tasks",
]

COMPILE_MIN_BATCHES = 8
"""``predict`` compiles automatically (on CUDA) from this many batches in one group."""

Precision = Literal["fp32", "bf16"]
"""Forward precisions: fp32, or bf16 autocast."""
PRECISIONS: tuple[str, ...] = get_args(Precision)

DecodeMode = Literal["auto", "threads", "processes"]
"""Who decodes images: threads of this process, worker processes, or ``auto`` (processes from
:data:`PROCESS_DECODE_MIN_WORKERS` workers on, where threads would be held back by the GIL)."""

PROCESS_DECODE_MIN_WORKERS = 4

MIN_SPARE_ROWS = 16
"""Spare task rows a model keeps at least (a quarter of its tasks beyond that): tasks registered while serving
take one each, with no new compiled graph."""
MIN_HEAD_WIDTH = 16
"""Head columns a model keeps at least (rounded up to a power of two above that), so that new tasks of up to
that many classes fit the compiled forwards."""
_SPARE = "#spare-"  # row names no task can have: task names start with a lower-case letter or a digit
_RETIRED = "#retired-"
Answer = tuple[list[str], list[float], str, float | None]
"""One image's answer: its top-k labels and scores, the task that gave them (the routed one, or ``none``, for
``task: auto``) and the routing score (``None`` for an image that named its task)."""
_FROZEN = "#frozen"  # γ = 1, β = 0: the plain backbone, which routing (``task: auto``) runs


@dataclass(frozen=True)
class Prediction:
    """The top-k labels of one image under its task, with their softmax scores.

    For an image sent as ``task: auto``, ``task`` is the task routing chose (``none``, with no labels, when no
    task accepted it) and ``route_score`` the routing score that chose it.
    """

    path: Path | str
    task: str
    labels: list[str]
    scores: list[float]
    route_score: float | None = None


def folder_items(folder: str | os.PathLike[str], task: str) -> list[tuple[Path, str]]:
    """``(image, task)`` for every image file directly in ``folder``, sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    # Hidden files (macOS "._x.jpg" resource forks, editors' temp files) are skipped, as in training folders.
    files = sorted(
        p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise DataError(f"no image files in {root}")
    return [(p, task) for p in files]


# --------------------------------------------------------------------------------------- loading stored tasks
@dataclass
class LoadedTasks:
    """Stored tasks loaded onto their backbones: one :class:`MultiTaskSSF` per backbone, all its tasks on it.

    Attributes:
        models: The model of each backbone, by backbone name.
        backbones: The backbone records, by name.
        tasks: The task records, by task name.
    """

    models: dict[str, MultiTaskSSF] = field(default_factory=dict)
    backbones: dict[str, BackboneRecord] = field(default_factory=dict)
    tasks: dict[str, TaskRecord] = field(default_factory=dict)

    def model_of(self, task: str) -> MultiTaskSSF:
        """The model that holds ``task``."""
        return self.models[self.tasks[task].backbone]

    def data_config(self, task: str) -> dict[str, Any]:
        """The data config ``task`` was trained with."""
        record = self.tasks[task]
        return data_config(self.model_of(task).backbone, self.backbones[record.backbone], record.train_config)

    def transform(self, task: str) -> Callable:
        """The evaluation transform of ``task``."""
        record = self.tasks[task]
        return eval_transform(self.model_of(task).backbone, self.backbones[record.backbone], record.train_config)


def _read_tasks(
    engine: Engine, names: Sequence[str], versions: dict[str, int]
) -> tuple[dict[str, TaskRecord], dict[str, BackboneRecord], dict[str, bytes]]:
    """Records and payloads of tasks (latest versions unless named), with their backbones, in one session."""
    tasks: dict[str, TaskRecord] = {}
    backbones: dict[str, BackboneRecord] = {}
    payloads: dict[str, bytes] = {}
    with Session(engine) as s:
        for name in dict.fromkeys(names):
            record = registry.get_task(s, name, versions.get(name))
            if record.backbone not in backbones:
                backbones[record.backbone] = registry.get_backbone(s, record.backbone)
            if record.backbone_fingerprint != backbones[record.backbone].fingerprint:
                raise BackboneMismatchError(
                    f"task '{name}' was trained on weights with fingerprint {record.backbone_fingerprint[:12]}..., "
                    f"but backbone '{record.backbone}' now has {backbones[record.backbone].fingerprint[:12]}..."
                )
            tasks[name] = record
            payloads[name] = registry.get_task_payload(s, name, record.version)
    return tasks, backbones, payloads


def load_tasks(engine: Engine, names: Sequence[str], *, versions: dict[str, int] | None = None) -> LoadedTasks:
    """Load tasks from the registry, each onto a fresh copy of its backbone (one model per backbone).

    Raises:
        TaskNotFoundError: An unknown task or version.
        BackboneMismatchError: A task trained on other weights than its backbone has now.
    """
    tasks, backbones, payloads = _read_tasks(engine, names, versions or {})
    loaded = LoadedTasks(backbones=backbones, tasks=tasks)
    for backbone_name, backbone_record in backbones.items():
        loaded.models[backbone_name] = MultiTaskSSF(load_backbone(backbone_record)).eval()
    for name, record in tasks.items():
        loaded.models[record.backbone].load_task(name, task_tensors(payloads[name], name))
    return loaded


def evaluate_task(
    engine: Engine,
    name: str,
    data: str | os.PathLike[str],
    *,
    version: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> tuple[float, str, int]:
    """Top-1 accuracy of a stored task on a dataset, with the transform it was trained with.

    Classes are matched by name, so the dataset may hold a subset of the task's classes.

    Args:
        split: ``train``, ``val`` or ``test``; by default ``test``, else ``val``, else ``train`` (a manifest).

    Returns:
        ``(top-1, split used, number of images)``.

    Raises:
        DataError: The split is empty or holds a class the task does not know.
    """
    validate_name("task", name)
    with Session(engine) as s:
        record = registry.get_task(s, name, version)
    splits = load_splits(data)
    if split is None:
        split = next((n for n in ("test", "val", "train") if splits.split(n)), "test")
    samples = splits.split(split)
    if not samples:
        raise DataError(f"dataset {data} has no '{split}' images")
    unknown = [c for c in splits.class_names if c not in record.class_names]
    if unknown:
        raise DataError(
            f"class '{unknown[0]}' of dataset {data} is not a class of task '{name}' "
            f"(its classes: {', '.join(record.class_names)})"
        )
    remap = [record.class_names.index(c) for c in splits.class_names]
    samples = [ImageSample(path, remap[label]) for path, label in samples]
    loaded = load_tasks(engine, [name], versions={name: record.version})
    dataset = ImageDataset(samples, loaded.transform(name))
    top1 = evaluate(loaded.model_of(name), name, dataset, batch_size=batch_size, device=device, amp=False)
    return top1, split, len(samples)


# ------------------------------------------------------------------------------------------------ Predictor
@dataclass
class _Group:
    """The tasks of one backbone that see images the same way (one transform): their model and compiled forwards."""

    model: MultiTaskSSF
    stage: InputStage
    input_hw: tuple[int, int]
    forwards: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = field(default_factory=dict)


@dataclass(frozen=True)
class Prepared:
    """One decoded image waiting for its batch: its task, its group's key and the ``uint8 [H, W, 3]`` pixels."""

    task: str
    group: tuple
    image: torch.Tensor


@dataclass(frozen=True)
class TaskCatalog:
    """What a process that only decodes needs to know of the served tasks: their records, and per task the input
    stage (resize and crop) and size its images take. Picklable, so HTTP worker processes can hold a copy."""

    records: dict[str, TaskRecord]
    group_of: dict[str, tuple]
    stages: dict[tuple, tuple[InputStage, tuple[int, int]]]
    auto_group: tuple | None = None

    def prepare(self, image: ImageSource, task: str, name: str | None = None) -> Prepared:
        """Decode and resize one image for ``task`` in the calling thread.

        Raises:
            TaskNotFoundError: the task is not served.
            DataError: the image cannot be read (naming it ``name``).
        """
        key = _group_of(task, self.group_of, self.auto_group, self.records)
        stage, _ = self.stages[key]
        return Prepared(task, key, stage.to_uint8(image, name))


@dataclass(frozen=True)
class _State:
    """Everything a batch reads, replaced as a whole by ``refresh``: a batch that started on it finishes on it."""

    records: dict[str, TaskRecord]
    models: dict[str, MultiTaskSSF]  # by backbone name
    groups: dict[tuple, _Group]  # by (backbone, transform protocol, input size)
    group_of: dict[str, tuple]  # task name -> its group's key
    rows: dict[str, int]  # task name -> its row in its model's tables
    epoch: int = 0
    router: tuple[tuple, Router] | None = None  # the group that ``task: auto`` images go to, and its router


class Predictor:
    """Stored tasks loaded once onto their backbones, ready for mixed-task batches of images.

    Args:
        engine: The registry.
        tasks: Task names to load (latest versions); ``None`` loads every registered task.
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``fp32`` (equals the exported model's outputs) or ``bf16`` autocast (on CUDA it also lets mixed
            batches of ViT tasks take the mixed-batch kernels).
        compile: Run the forward through ``torch.compile``, one graph per batch-size bucket. ``None`` compiles on
            CUDA when a ``predict`` call has at least :data:`COMPILE_MIN_BATCHES` batches, so that compiling pays
            for itself; a server passes True and warms its buckets up before serving.
        threads: Image decoders (threads or processes); by default one per core.
        decode: Decode in ``threads``, in worker ``processes``, or ``auto`` (processes on 4 cores or more).
        routing: How ``task: auto`` images find their task: ``knn`` or ``prototype`` (see :mod:`ssf_tasks.routing`).

    Raises:
        TaskNotFoundError, BackboneMismatchError: as :func:`load_tasks`.
    """

    def __init__(
        self,
        engine: Engine,
        tasks: Sequence[str] | None = None,
        *,
        device: str = "auto",
        precision: Precision = "fp32",
        compile: bool | None = None,
        threads: int | None = None,
        decode: DecodeMode = "auto",
        routing: RoutingMethod = DEFAULT_METHOD,
    ) -> None:
        if precision not in PRECISIONS:
            raise DataError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'", field="precision")
        self.engine = engine
        self.device = resolve_device(device)
        self.precision = precision
        self.compile = compile
        self.routing_method = routing
        self._entries: dict[str, RoutingEntry] = {}  # routing entries of the loaded tasks that have one
        self.warm_batch_sizes: tuple[int, ...] = ()
        self.last_timing: dict[str, float] = {}
        """Seconds of the last ``predict`` call: to its first batch's answers (decode, and compile where it
        compiles) and in all."""
        started = time.perf_counter()
        if decode not in get_args(DecodeMode):
            raise DataError(f"decode must be one of {', '.join(get_args(DecodeMode))}, got '{decode}'", field="decode")
        workers = threads or decode_threads()
        if decode == "processes" or (decode == "auto" and workers >= PROCESS_DECODE_MIN_WORKERS):
            from .decode_workers import ProcessDecoder

            self.decoder: ThreadDecoder | ProcessDecoder = ProcessDecoder(workers, pin=self.device.type == "cuda")
            self.pool = ThreadPoolExecutor(max_workers=4 * workers, thread_name_prefix="ssf-prepare")
        else:
            self.decoder = ThreadDecoder(workers)
            self.pool = self.decoder.pool
        self._refreshing = threading.Lock()
        self._flight_lock = threading.Lock()
        self._in_flight: Counter[int] = Counter()  # epoch -> calls reading that state
        self._retired: list[tuple[int, str, str]] = []  # (first epoch not reading it, backbone, row name)
        self._row_names = itertools.count()
        self._state = _State({}, {}, {}, {}, {})
        names = tasks
        if names is None:
            with Session(engine) as s:
                names = [r.name for r in registry.list_tasks(s)]
        self._state = self._build(list(names), set())
        self.load_seconds = time.perf_counter() - started
        """Seconds this Predictor took to start: decoders, registry reads, backbones and task tables."""

    # ------------------------------------------------------------------------------------- tasks
    @property
    def task_names(self) -> list[str]:
        """The loaded tasks, sorted."""
        return sorted(self._state.records)

    def record(self, task: str) -> TaskRecord:
        """The loaded record of ``task`` (its version, classes, metrics).

        Raises:
            TaskNotFoundError: the task is not loaded.
        """
        records = self._state.records
        if task not in records:
            known = ", ".join(sorted(records)) or "none"
            raise TaskNotFoundError(f"unknown task '{task}'; known tasks: {known}")
        return records[task]

    def _build(self, read: list[str], drop: set[str]) -> _State:
        """A new state: the current one with tasks ``read`` (re)loaded from the registry and ``drop`` removed.

        Backbones none of whose tasks change keep their model and compiled forwards. The others take the new tasks
        into spare rows in place where they fit (:meth:`_build_in_place`), else get a copy of their model (the
        serving one is never reshaped under a running batch), warmed up before it serves.
        """
        old = self._state
        tasks, backbones, payloads = _read_tasks(self.engine, read, {})
        states = {name: task_tensors(payloads[name], name) for name in tasks}
        with Session(self.engine) as s:
            routing = registry.get_task_routing(s, {name: record.version for name, record in tasks.items()})
        entries = {n: e for n, e in self._entries.items() if n not in drop and n not in tasks}
        entries.update({name: entry_from_payload(payload, name) for name, payload in routing.items()})
        in_place = self._build_in_place(tasks, states, drop)
        if in_place is not None:
            self._entries = entries
            return self._with_router(in_place)
        records = {n: r for n, r in old.records.items() if n not in drop}
        records.update(tasks)
        changed = {r.backbone for r in tasks.values()} | {old.records[n].backbone for n in drop if n in old.records}
        models: dict[str, MultiTaskSSF] = {}
        for record in records.values():
            backbone = record.backbone
            if backbone in models:
                continue
            if backbone not in old.models:
                models[backbone] = MultiTaskSSF(load_backbone(backbones[backbone])).eval().to(self.device)
            elif backbone not in changed:
                models[backbone] = old.models[backbone]
            else:
                models[backbone] = model = copy.deepcopy(old.models[backbone])
                for name in model.task_names:  # retired rows, removed tasks and the old versions of updated ones
                    if not name.startswith((_SPARE, _FROZEN)) and (name not in records or name in tasks):
                        model.remove_task(name)
                self._retired = [r for r in self._retired if r[1] != backbone]
        for backbone in changed & set(models):
            model = models[backbone]
            model.load_tasks({n: states[n] for n, r in tasks.items() if r.backbone == backbone})
            self._reserve(model)
        groups: dict[tuple, _Group] = {}
        group_of: dict[str, tuple] = {}
        for name, record in sorted(records.items()):
            config = record.train_config
            key = (record.backbone, config.transform, config.input_size)
            group_of[name] = key
            if key in groups:
                continue
            if record.backbone not in changed and key in old.groups:
                groups[key] = old.groups[key]
                continue
            model = models[record.backbone]
            backbone_record = backbones.get(record.backbone) or self._backbone_record(record.backbone)
            stage = split_transform(eval_transform(model.backbone, backbone_record, config))
            probe = stage.resize(Image.new("RGB", (64, 64)))
            groups[key] = _Group(model, stage, (probe.height, probe.width))
        rows = {name: models[record.backbone].task_index(name) for name, record in records.items()}
        self._entries = entries
        state = self._with_router(_State(records, models, groups, group_of, rows, old.epoch + 1))
        if self.warm_batch_sizes:
            self._warm(state, self.warm_batch_sizes)
        return state

    def _with_router(self, state: _State) -> _State:
        """``state`` with the router of ``task: auto`` images: over the routable tasks of the input group that
        has most of them (routing features of different backbones or input sizes cannot be compared)."""
        routable: dict[tuple, dict[str, RoutingEntry]] = {}
        for name, entry in self._entries.items():
            if name in state.group_of:
                routable.setdefault(state.group_of[name], {})[name] = entry
        if not routable:
            return replace(state, router=None)
        key = max(routable, key=lambda k: (len(routable[k]), k))
        return replace(state, router=(key, Router(routable[key], self.routing_method, self.device)))

    def _reserve(self, model: MultiTaskSSF) -> None:
        """Give ``model`` its spare rows and head columns (see :data:`MIN_SPARE_ROWS`, :data:`MIN_HEAD_WIDTH`)."""
        width = max(MIN_HEAD_WIDTH, model.max_classes)
        model.widen_heads(1 << (width - 1).bit_length())
        if _FROZEN not in model.task_names:
            model.add_tasks({_FROZEN: 1})
            state = model.task_state_dict(_FROZEN)
            model.update_task(
                _FROZEN,
                {k: torch.ones_like(v) if k.endswith("ssf_scale") else torch.zeros_like(v) for k, v in state.items()},
            )
        tasks = sum(not n.startswith((_SPARE, _RETIRED, _FROZEN)) for n in model.task_names)
        spares = sum(n.startswith(_SPARE) for n in model.task_names)
        wanted = max(MIN_SPARE_ROWS, tasks // 4) - spares
        if wanted > 0:
            model.add_tasks({f"{_SPARE}{next(self._row_names)}": 1 for _ in range(wanted)})

    def _build_in_place(
        self, tasks: dict[str, TaskRecord], states: dict[str, dict[str, torch.Tensor]], drop: set[str]
    ) -> _State | None:
        """The new state with every task of ``tasks`` written into a spare row of its serving model, or ``None``
        where one does not fit (a new backbone or input transform, no spare row left, more classes than columns).

        A dropped task's row, and the old version's row of an updated task, are retired: running batches of the
        current state may still read them (see :meth:`_release_retired`).
        """
        old = self._state
        self._release_retired()
        need: Counter[str] = Counter()
        for name, record in tasks.items():
            model = old.models.get(record.backbone)
            config = record.train_config
            if model is None or (record.backbone, config.transform, config.input_size) not in old.groups:
                return None
            if int(states[name]["head.weight"].shape[0]) > model.max_classes:
                return None
            need[record.backbone] += 1
        for backbone, count in need.items():
            if sum(n.startswith(_SPARE) for n in old.models[backbone].task_names) < count:
                return None
        epoch = old.epoch + 1
        for name in [*drop, *(n for n in tasks if n in old.records)]:
            backbone = old.records[name].backbone
            retired = f"{_RETIRED}{next(self._row_names)}"
            old.models[backbone].rename_task(name, retired)
            self._retired.append((epoch, backbone, retired))
        for name, record in tasks.items():
            model = old.models[record.backbone]
            spare = next(n for n in model.task_names if n.startswith(_SPARE))
            model.write_task(spare, name, states[name])
        records = {n: r for n, r in old.records.items() if n not in drop}
        records.update(tasks)
        group_of = {
            name: (record.backbone, record.train_config.transform, record.train_config.input_size)
            for name, record in records.items()
        }
        groups = {key: old.groups[key] for key in set(group_of.values())}
        models = {record.backbone: old.models[record.backbone] for record in records.values()}
        rows = {name: models[record.backbone].task_index(name) for name, record in records.items()}
        return _State(records, models, groups, group_of, rows, epoch)

    def _release_retired(self) -> None:
        """Make retired rows spare again once no call is reading a state that may index them."""
        with self._flight_lock:
            oldest = min(self._in_flight, default=None)
        keep = []
        for epoch, backbone, name in self._retired:
            model = self._state.models.get(backbone)
            if model is None or name not in model.task_names:
                continue
            if oldest is not None and oldest < epoch:
                keep.append((epoch, backbone, name))
            else:
                model.rename_task(name, f"{_SPARE}{next(self._row_names)}")
        self._retired = keep

    @contextmanager
    def _reading(self) -> Iterator[_State]:
        """The current state, counted as read until the block ends (retired rows wait for such readers)."""
        with self._flight_lock:
            state = self._state
            self._in_flight[state.epoch] += 1
        try:
            yield state
        finally:
            with self._flight_lock:
                self._in_flight[state.epoch] -= 1
                if not self._in_flight[state.epoch]:
                    del self._in_flight[state.epoch]

    def _backbone_record(self, name: str) -> BackboneRecord:
        with Session(self.engine) as s:
            return registry.get_backbone(s, name)

    def refresh(self) -> dict[str, list[str]]:
        """Catch up with the registry: load tasks registered or versioned since, drop removed ones.

        The new state is built (and warmed up, where compiling is on) beside the serving one, then replaces it in
        one assignment; batches keep running on the old state meanwhile.

        Returns:
            ``{"added": [...], "updated": [...], "removed": [...]}`` (task names); all empty when nothing changed.
        """
        with self._refreshing:
            with Session(self.engine) as s:
                latest = {r.name: r.version for r in registry.list_tasks(s)}
            current = self._state.records
            added = sorted(n for n in latest if n not in current)
            updated = sorted(n for n in latest if n in current and latest[n] != current[n].version)
            removed = sorted(n for n in current if n not in latest)
            if added or updated or removed:
                self._state = self._build(added + updated, set(removed))
            return {"added": added, "updated": updated, "removed": removed}

    # ------------------------------------------------------------------------------------- running
    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Compile (where compiling is on) and run every group once at each batch size; tasks loaded later by
        :meth:`refresh` are warmed up at the same sizes before they serve."""
        self.warm_batch_sizes = tuple(sorted(set(batch_sizes)))
        self._warm(self._state, self.warm_batch_sizes)

    def _warm(self, state: _State, batch_sizes: Sequence[int]) -> None:
        for key, group in state.groups.items():
            row = next(state.rows[n] for n, k in state.group_of.items() if k == key)
            for size in batch_sizes:
                images = torch.zeros(size, *group.input_hw, 3, dtype=torch.uint8)
                self._logits(group, images, [row] * size, size, compiled=bool(self.compile))

    def bucket(self, count: int) -> int:
        """The smallest warmed-up batch size that holds ``count`` images (``count`` itself if none does)."""
        return next((size for size in self.warm_batch_sizes if size >= count), count)

    def _logits(
        self,
        group: _Group,
        images: torch.Tensor,
        rows: Sequence[int],
        bucket: int,
        *,
        compiled: bool,
    ) -> torch.Tensor:
        """Logits ``[b, max_classes]`` of one ``uint8 [b, H, W, 3]`` batch (``b <= bucket``) whose samples read the
        task rows ``rows``, padded to ``bucket`` when compiled."""
        model = group.model
        count = images.shape[0]
        index = torch.tensor(rows, dtype=torch.long)
        compiled = compiled and self.device.type == "cuda"
        if compiled and count < bucket:  # one static shape per bucket: no recompilation for a short batch
            images = torch.cat([images, images.new_zeros(bucket - count, *images.shape[1:])])
            index = torch.cat([index, index.new_zeros(bucket - count)])
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = model
        if compiled:
            if bucket not in group.forwards:
                group.forwards[bucket] = torch.compile(model, dynamic=False)
            forward = group.forwards[bucket]
        x = group.stage.normalize(images.to(self.device, non_blocking=True))
        amp = self.precision == "bf16"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(x, index.to(self.device, non_blocking=True))
        return logits[:count]

    def predict(
        self,
        items: Sequence[tuple[ImageSource, str]],
        *,
        batch_size: int = 64,
        top_k: int = 1,
        source: str = "input",
    ) -> list[Prediction]:
        """Predict every ``(image, task)`` item, mixing tasks freely within each batch.

        Items are grouped by backbone and input transform (in practice: by backbone); each group runs in batches
        of mixed tasks through one forward of the shared backbone, while the decoders fill the next batches.

        Args:
            items: ``(image path or encoded bytes, task name)`` pairs.
            batch_size: Images per forward pass.
            top_k: Labels per image (fewer when a task has fewer classes).
            source: How to name the items in error messages (e.g. the manifest's file name).

        Returns:
            One prediction per item, in input order.

        Raises:
            TaskNotFoundError: naming the first item with an unknown task.
            DataError: naming the first unreadable image.
        """
        if top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}", field="top_k")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}", field="batch_size")
        if not items:
            raise DataError(f"{source} has no rows")
        with self._reading() as state:  # one consistent view, whatever refresh does meanwhile
            return self._predict(state, items, batch_size, top_k, source)

    def _predict(
        self, state: _State, items: Sequence[tuple[ImageSource, str]], batch_size: int, top_k: int, source: str
    ) -> list[Prediction]:
        router_key = state.router[0] if state.router is not None else None
        by_group: dict[tuple, list[int]] = {}
        for i, (image, task) in enumerate(items):
            try:
                key = _group_of(task, state.group_of, router_key, state.records)
            except TaskNotFoundError as e:
                raise TaskNotFoundError(f"{source} row {i + 1} ({_label(image, source, i + 1)}): {e}") from None
            by_group.setdefault(key, []).append(i)
        results: list[Prediction | None] = [None] * len(items)
        started, first = time.perf_counter(), None
        for key, indices in by_group.items():
            group = state.groups[key]
            batches = -(-len(indices) // batch_size)
            compiled = self.compile if self.compile is not None else batches >= COMPILE_MIN_BATCHES
            sources = [items[i][0] for i in indices]
            names = [_label(items[i][0], source, i + 1) for i in indices]
            pin = self.device.type == "cuda"
            batches_of = iter_batches(
                self.decoder, group.stage, sources, batch_size, group.input_hw, names=names, pin=pin
            )
            for images, span in batches_of:
                rows = [indices[j] for j in span]
                bucket = batch_size if compiled else len(rows)
                answers = self._answer(state, group, images, [items[i][1] for i in rows], bucket, top_k, compiled)
                for i, (labels, scores, task, route_score) in zip(rows, answers, strict=True):
                    image = items[i][0]
                    path = _label(image, source, i + 1) if isinstance(image, bytes) else Path(image)
                    results[i] = Prediction(path, task, labels, scores, route_score)
                first = first or time.perf_counter() - started
        self.last_timing = {"first_batch_s": first or 0.0, "total_s": time.perf_counter() - started}
        return [r for r in results if r is not None]

    def catalog(self) -> TaskCatalog:
        """The served tasks as :class:`TaskCatalog` (a new one after each change that ``refresh`` makes)."""
        state = self._state
        stages = {key: (group.stage, group.input_hw) for key, group in state.groups.items()}
        auto_group = state.router[0] if state.router is not None else None
        return TaskCatalog(dict(state.records), dict(state.group_of), stages, auto_group)

    def prepare(self, image: ImageSource, task: str, name: str | None = None) -> Prepared:
        """Decode and resize one image for ``task`` (thread-safe; a server runs it in :attr:`pool`).

        Raises:
            TaskNotFoundError: the task is not loaded.
            DataError: the image cannot be read (naming it ``name``).
        """
        state = self._state
        key = _group_of(task, state.group_of, state.router[0] if state.router is not None else None, state.records)
        group = state.groups[key]
        return Prepared(task, key, self.decoder.decode_one(group.stage, image, name, group.input_hw))

    def run_prepared(self, items: Sequence[Prepared], top_k: int = 1) -> list[Answer | str]:
        """One mixed batch of prepared images (any tasks, ``auto`` included): per item an :data:`Answer`, or an
        error message for an item whose task was removed or changed its transform since it was prepared."""
        with self._reading() as state:
            return self._run_prepared(state, items, top_k)

    def _run_prepared(self, state: _State, items: Sequence[Prepared], top_k: int) -> list[Answer | str]:
        out: list[Answer | str] = [""] * len(items)
        by_group: dict[tuple, list[int]] = {}
        router_key = state.router[0] if state.router is not None else None
        for i, item in enumerate(items):
            if item.task == AUTO_TASK and router_key != item.group:
                out[i] = "the routed tasks changed since the image was prepared; send the image again"
            elif item.task != AUTO_TASK and state.group_of.get(item.task) != item.group:
                out[i] = f"task '{item.task}' is no longer served as it was; send the image again"
            else:
                by_group.setdefault(item.group, []).append(i)
        largest = max(self.warm_batch_sizes, default=0)
        chunks = [
            (key, rows[start : start + (largest or len(rows))])
            for key, rows in by_group.items()
            for start in range(0, len(rows), largest or len(rows))
        ]
        for key, rows in chunks:  # no batch beyond the largest warmed-up size: it would compile a new graph
            tasks = [items[i].task for i in rows]
            images = torch.stack([items[i].image for i in rows])
            group, bucket = state.groups[key], self.bucket(len(rows))
            answers = self._answer(state, group, images, tasks, bucket, top_k, bool(self.compile))
            for i, answer in zip(rows, answers, strict=True):
                out[i] = answer
        return out

    def _answer(
        self,
        state: _State,
        group: _Group,
        images: torch.Tensor,
        tasks: list[str],
        bucket: int,
        top_k: int,
        compiled: bool,
    ) -> list[Answer]:
        """One batch of one group: ``task: auto`` images routed first (one forward of the plain backbone to the
        routing depth), then every image that has a task through one mixed forward."""
        routes: dict[int, tuple[str, float]] = {}
        auto = [j for j, task in enumerate(tasks) if task == AUTO_TASK]
        if auto:
            assert state.router is not None  # auto images are only grouped where a router exists
            routes = dict(zip(auto, self._route(group, state.router[1], images[auto]), strict=True))
        chosen = [routes[j][0] if j in routes else task for j, task in enumerate(tasks)]
        scores = [routes[j][1] if j in routes else None for j in range(len(tasks))]
        answers: list[Answer] = [([], [], NO_TASK, score) for score in scores]
        run = [j for j, task in enumerate(chosen) if task != NO_TASK]
        if run:
            selected = images if len(run) == len(tasks) else images[run]
            run_tasks = [chosen[j] for j in run]
            logits = self._logits(group, selected, [state.rows[t] for t in run_tasks], bucket, compiled=compiled)
            for j, (labels, top) in zip(run, self.top_k(logits, run_tasks, top_k, state=state), strict=True):
                answers[j] = (labels, top, chosen[j], scores[j])
        return answers

    def _route(self, group: _Group, router: Router, images: torch.Tensor) -> list[tuple[str, float]]:
        """``(task, score)`` of each ``uint8 [b, H, W, 3]`` image, from the plain backbone's features."""
        model = group.model
        layer = feature_layer(model.backbone, router.depth)
        x = group.stage.normalize(images.to(self.device, non_blocking=True))
        amp = self.precision == "bf16"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            features = model.call_backbone(x, _FROZEN, lambda backbone, x: pooled_features(backbone, x, layer))
        return router.route(features)

    def top_k(
        self, logits: torch.Tensor, tasks: Sequence[str], k: int, *, state: _State | None = None
    ) -> list[tuple[list[str], list[float]]]:
        """``(labels, softmax scores)`` of each row's ``k`` best classes of its own task."""
        probs = logits.float().softmax(dim=-1).cpu()
        scores, columns = probs.topk(min(k, probs.shape[1]), dim=-1)
        records = (state or self._state).records
        out = []
        for j, task in enumerate(tasks):
            names = records[task].class_names
            n = min(k, len(names))
            out.append(([names[c] for c in columns[j, :n].tolist()], [float(v) for v in scores[j, :n]]))
        return out

    def close(self) -> None:
        """Stop the decoders (threads or processes)."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.decoder.close()


def _group_of(task: str, group_of: dict[str, tuple], router_key: tuple | None, records: dict) -> tuple:
    """The input group an image of ``task`` (``auto`` included) is decoded and run in."""
    if task == AUTO_TASK:
        if router_key is None:
            raise TaskNotFoundError(
                "task 'auto' needs routing entries, and no served task has one (tasks registered by task add have)"
            )
        return router_key
    if task not in group_of:
        known = ", ".join(sorted(records)) or "none"
        raise TaskNotFoundError(f"unknown task '{task}'; known tasks: {known}")
    return group_of[task]


def _label(image: ImageSource, source: str, row: int) -> str:
    return f"{source} item {row}" if isinstance(image, bytes) else str(image)
