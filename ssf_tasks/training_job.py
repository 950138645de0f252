"""Register a downstream task: check everything, train γ/β and the head on the frozen backbone, store one version.

Everything that can be checked is checked before training (names, backbone, a duplicate task, the ``init_from``
task, every image, the backbone's weights), and the registry is written in one transaction at the very end, so a
failure at any point (bad data, NaN loss, Ctrl-C) leaves it exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from torch.utils.data import Dataset

from . import registry
from .catalog import check_input_size, load_backbone, transform
from .config import BackboneRecord, TaskMetrics, TaskRecord, TrainConfig, validate_name
from .data import DatasetSplits, ImageDataset, load_splits
from .distributed import check_data_parallel, train_distributed
from .errors import BackboneMismatchError, DataError
from .model import MultiTaskSSF
from .routing import (
    AUTO_TASK,
    DEFAULT_DEPTH,
    Router,
    RoutingEntry,
    build_entry,
    dataset_features,
    entry_from_payload,
    entry_payload,
    feature_layer,
)
from .taskfiles import task_payload, task_tensors
from .train import TrainProgress, TrainResult, evaluate, fit_probe_head, resolve_device, train_task

__all__ = ["train_and_store"]


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
            the same) start this run, or is ``auto``: the closest stored task (see :func:`_closest_task`); the
            stored config names the task chosen.
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
    check_data_parallel(config)  # config.nproc > 1: a batch that splits evenly, a GPU per process
    auto_init = config.init_from == AUTO_TASK
    if config.init_from is not None and not auto_init:
        validate_name("task", config.init_from)
    init: tuple[TaskRecord, bytes] | None = None
    with Session(engine) as s:
        backbone_record = registry.get_backbone(s, backbone)
        registry.check_task_addable(s, name, new_version=new_version)
        if config.init_from is not None and not auto_init:
            init = _init_source(s, config.init_from, backbone_record)
        registry.check_writable(s)  # rolled back when the session closes

    splits = load_splits(data)
    if config.refit and not splits.val:
        raise DataError(f"--refit needs a val/ split in {data} to choose its number of epochs on", field="refit")
    module = load_backbone(backbone_record)
    check_input_size(module, backbone_record, config)
    eval_tf = transform(module, backbone_record, config, train=False)
    routing = _routing_entry(module, splits, eval_tf, config)  # on the plain backbone, before SSF sites go in
    if auto_init:  # the stored task whose classes look most like this dataset's, or a cold start if none is stored
        chosen = _closest_task(engine, backbone_record, name, routing)
        config = config.model_copy(update={"init_from": chosen})
        if chosen is not None:
            with Session(engine) as s:
                init = _init_source(s, chosen, backbone_record)
    model = MultiTaskSSF(module, sigma=config.sigma)
    model.add_task(name, splits.num_classes, generator=torch.Generator().manual_seed(config.seed))
    if init is not None:
        source, payload = init
        start = task_tensors(payload, source.name)
        state = model.task_state_dict(name)
        keep_head = list(source.class_names) == list(splits.class_names)
        missing = [k for k in state if k not in start]
        if missing:
            raise BackboneMismatchError(
                f"init_from task '{source.name}' has no entry '{missing[0]}'", field="init_from"
            )
        state.update({k: start[k] for k in state if keep_head or not k.startswith("head.")})
        model.update_task(name, state)

    train_tf = transform(module, backbone_record, config, train=True)
    train = train_task if config.nproc == 1 else train_distributed  # the same contract, over nproc processes
    start = model.task_state_dict(name)
    test_set = ImageDataset(splits.test, eval_tf) if splits.test else None
    result = train(
        model,
        name,
        ImageDataset(splits.train, train_tf),
        config,
        val_set=ImageDataset(splits.val, eval_tf) if splits.val else None,
        test_set=None if config.refit else test_set,  # with a refit, only the refitted state is scored on test
        progress=progress,
    )
    refit_epochs = None
    if config.refit:
        refit_epochs = result.best_epoch
        both = ImageDataset(splits.train + splits.val, train_tf)
        result = _refit(train, model, name, start, result, both, test_set, config, progress)
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
            history=result.history,
            refit_epochs=refit_epochs,
        ),
    )
    payload = task_payload(model.task_state_dict(name))
    with registry.transaction(engine, f"storing task '{name}'") as s:
        stored = registry.add_task_version(s, record, payload, new_version=new_version)
        registry.set_task_routing(s, name, stored.version, entry_payload(routing))
    return stored, result


def _refit(
    train: Callable[..., TrainResult],
    model: MultiTaskSSF,
    name: str,
    start: dict[str, torch.Tensor],
    selection: TrainResult,
    both: Dataset,
    test: Dataset | None,
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None,
) -> TrainResult:
    """Train again from ``start`` on train + val for the best number of epochs that ``selection`` found on val.

    val has then been trained on, so the result keeps the selection run's val top-1, best epoch and history; its
    test top-1 is the refit model's, its epochs and seconds are the two runs' sums. When the probe head won on val
    (best epoch 0), the refit is the probe head alone, fitted on train + val.
    """
    model.update_task(name, start)
    if selection.best_epoch == 0:
        started = time.perf_counter()
        fit_probe_head(model, name, both, config)
        score = None
        if test is not None:
            device = resolve_device(config.device)
            score = evaluate(
                model,
                name,
                test,
                batch_size=config.batch_size,
                device=device,
                amp=config.amp,
                num_workers=config.num_workers,
            )
        refit = TrainResult(0, 0, None, score, time.perf_counter() - started)
    else:
        again = config.model_copy(update={"epochs": selection.best_epoch, "patience": None})
        refit = train(model, name, both, again, test_set=test, progress=progress)
    return dataclasses.replace(
        selection,
        test_top1=refit.test_top1,
        epochs_run=selection.epochs_run + refit.epochs_run,
        train_seconds=selection.train_seconds + refit.train_seconds,
    )


def _init_source(s: Session, task: str, backbone: BackboneRecord) -> tuple[TaskRecord, bytes]:
    """The latest version of the task that starts this run, and its payload, checked to be of ``backbone``."""
    source = registry.get_task(s, task)
    if source.backbone_fingerprint != backbone.fingerprint:
        raise BackboneMismatchError(
            f"init_from task '{source.name}' was trained on backbone '{source.backbone}', not on "
            f"'{backbone.name}' (fingerprints differ); it can only start tasks of its own backbone",
            field="init_from",
        )
    return source, registry.get_task_payload(s, source.name, source.version)


def _closest_task(engine: Engine, backbone: BackboneRecord, name: str, entry: RoutingEntry) -> str | None:
    """For ``--init-from auto``: the stored task of ``backbone`` (other than ``name``) whose class means are closest
    to this dataset's training images (mean over the images of the best cosine similarity to one of its class
    means), or ``None`` when no such task has a routing entry."""
    with Session(engine) as s:
        candidates = {
            r.name: r.version
            for r in registry.list_tasks(s)
            if r.name != name and r.backbone_fingerprint == backbone.fingerprint
        }
        payloads = registry.get_task_routing(s, candidates)
    entries = {task: entry_from_payload(payload, task) for task, payload in payloads.items()}
    entries = {task: e for task, e in entries.items() if e.depth == entry.depth}
    if not entries:
        return None
    router = Router(entries, "prototype", torch.device("cpu"))
    return router.tasks[int(router.scores(entry.features.float()).mean(0).argmax())]


def _routing_entry(module: torch.nn.Module, splits: DatasetSplits, eval_tf: Callable, config: TrainConfig):
    """The task's routing entry (see :mod:`ssf_tasks.routing`): frozen features of train, thresholds from val."""
    device = resolve_device(config.device)
    layer = feature_layer(module, DEFAULT_DEPTH)
    train = dataset_features(module, ImageDataset(splits.train, eval_tf), layer, device)
    val = dataset_features(module, ImageDataset(splits.val, eval_tf), layer, device) if splits.val else None
    return build_entry(*train, val[0] if val is not None else None, depth=DEFAULT_DEPTH, seed=config.seed)
