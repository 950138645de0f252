"""Backbones and tasks in the registry: register a backbone, list, show and remove, rebuild a stored backbone.

Plain functions over a registry engine; each opens its own session. The checks live in ``registry``; this module
only adds what needs the model (weights, fingerprints, data configs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from torch import nn

from . import registry
from .backbones import create_backbone, describe_weights, fingerprint, weights_data_config
from .config import BackboneRecord, TaskRecord, TrainConfig
from .data import build_transform, resolve_input_config
from .errors import BackboneMismatchError, DataError

__all__ = [
    "add_backbone",
    "check_input_size",
    "data_config",
    "eval_transform",
    "list_backbones",
    "list_tasks",
    "load_backbone",
    "remove_task",
    "show_task",
    "transform",
]


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
    with Session(engine) as s:
        registry.check_backbone_addable(s, name)
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


def check_input_size(backbone: nn.Module, record: BackboneRecord, config: TrainConfig) -> None:
    """Refuse an input size the backbone cannot take (a ViT or Swin built for its pretrained size), before any work.

    One blank image of that size goes through the backbone (in eval mode, so no statistics change): a failure there
    would otherwise come as a traceback from deep inside timm once training has started.

    Raises:
        DataError: naming the size, the backbone and the size it takes.
    """
    if config.input_size is None:
        return
    import torch

    channels, height, width = data_config(backbone, record, config)["input_size"]
    was_training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval()(torch.zeros(1, channels, height, width, device=next(backbone.parameters()).device))
    except (AssertionError, RuntimeError, ValueError) as e:
        pretrained = resolve_input_config(backbone)["input_size"]
        raise DataError(
            f"backbone '{record.name}' ({record.timm_name}) does not take {height}x{width} inputs "
            f"({' '.join(str(e).split())}); leave out --input-size to use its {pretrained[1]}x{pretrained[2]}",
            field="input_size",
        ) from e
    finally:
        backbone.train(was_training)


def transform(backbone: nn.Module, record: BackboneRecord, config: TrainConfig, *, train: bool) -> Callable:
    """The training or evaluation transform of a task trained with ``config`` on this backbone."""
    override = weights_data_config(record.weights_source) or {}
    return build_transform(
        backbone,
        train=train,
        protocol=config.transform,
        input_size=config.input_size,
        mean=override.get("mean"),
        std=override.get("std"),
    )


def eval_transform(backbone: nn.Module, record: BackboneRecord, config: TrainConfig) -> Callable:
    """The evaluation transform: what ``predict``, ``task eval`` and the server apply."""
    return transform(backbone, record, config, train=False)


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
