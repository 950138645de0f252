"""Task-agnostic inference: which stored task does an image belong to?

Every task version keeps a *routing entry* in the registry, written by ``task add`` beside its γ/β: the frozen
backbone's features of the task's training images (L2-normalised, float16, at most :data:`MAX_STORED`), their
class indices, and per routing method an acceptance threshold chosen on the task's own val images. An entry
depends on its task alone, so adding or removing a task never touches the others' entries.

Routing an image means one forward of the frozen backbone (γ = 1, β = 0) to ``depth`` of its layers, then a
score for each candidate task:

* ``prototype``: the best cosine similarity to one of the task's class means;
* ``knn``: the mean cosine similarity to the task's :data:`KNN_K` nearest stored images.

The best-scoring task wins if its score reaches that task's threshold; otherwise the answer is "none" (open set).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import safetensors.torch
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import DataError, SSFTasksError

__all__ = [
    "ACCEPT_QUANTILE",
    "AUTO_TASK",
    "DEFAULT_DEPTH",
    "DEFAULT_METHOD",
    "KNN_K",
    "MAX_STORED",
    "NO_TASK",
    "Router",
    "RoutingEntry",
    "RoutingMethod",
    "build_entry",
    "dataset_features",
    "entry_from_payload",
    "entry_payload",
    "feature_layer",
    "pooled_features",
]

RoutingMethod = Literal["prototype", "knn"]
DEFAULT_METHOD: RoutingMethod = "knn"
AUTO_TASK = "auto"
"""The task name a request gives when it does not know its task (no task may be named so)."""
NO_TASK = "none"
"""The task an image gets when no stored task accepts it."""
DEFAULT_DEPTH = 0.5
"""Fraction of the backbone's feature levels that routing runs: half a forward, so that routing and the chosen
task's forward together cost about 1.5 forwards."""
MAX_STORED = 2048
"""Training images kept per task entry (a class-balanced-in-expectation random subset beyond that)."""
KNN_K = 5
ACCEPT_QUANTILE = 0.05
"""A task's threshold is the score its own val images reach in 95% of cases: 5% of them would be rejected."""


def feature_layer(backbone: nn.Module, depth: float) -> int | None:
    """The ``forward_intermediates`` index whose output routing pools, or ``None`` for the full pre-logit
    features (``depth`` 1)."""
    if not 0 < depth <= 1:
        raise DataError(f"routing depth must be in (0, 1], got {depth}", field="depth")
    if depth == 1:
        return None
    levels = len(getattr(backbone, "feature_info", ()) or ())
    if levels == 0 or not hasattr(backbone, "forward_intermediates"):
        raise SSFTasksError(f"{type(backbone).__name__} has no feature levels to route on; use routing depth 1")
    return max(0, math.ceil(levels * depth) - 1)


def pooled_features(backbone: nn.Module, images: torch.Tensor, layer: int | None) -> torch.Tensor:
    """L2-normalised float32 features ``[B, D]``: the pre-logit features, or the mean over positions of feature
    level ``layer`` (run with ``stop_early``, so the layers above it cost nothing)."""
    if layer is None:
        features = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    else:
        (level,) = backbone.forward_intermediates(images, indices=[layer], stop_early=True, intermediates_only=True)
        features = level.flatten(2).mean(2) if level.ndim == 4 else level.mean(1)
    return nn.functional.normalize(features.float(), dim=1)


@torch.no_grad()
def dataset_features(
    backbone: nn.Module, dataset: Dataset, layer: int | None, device: torch.device, *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(unit features [N, D], labels [N])`` of a labelled dataset under the plain (not yet adapted) backbone."""
    backbone.eval().to(device)
    features, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features.append(pooled_features(backbone, images.to(device), layer).cpu())
        labels.append(torch.as_tensor(y))
    if not features:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


@dataclass(frozen=True)
class RoutingEntry:
    """One task version's routing data: normalised frozen features of its training images and their classes."""

    features: torch.Tensor  # [N, D] float16, unit rows
    labels: torch.Tensor  # [N] int64 class indices
    thresholds: dict[str, float]  # routing method -> acceptance threshold
    depth: float

    @property
    def prototypes(self) -> torch.Tensor:
        """Unit class means ``[C, D]`` (classes with no stored image are left out)."""
        features = self.features.float()
        classes = torch.unique(self.labels)
        means = torch.stack([features[self.labels == c].mean(0) for c in classes])
        return nn.functional.normalize(means, dim=1)


def _task_scores(
    method: RoutingMethod, features: torch.Tensor, keys: torch.Tensor, owner: torch.Tensor, tasks: int
) -> torch.Tensor:
    """Scores ``[B, tasks]`` of unit ``features`` against unit ``keys`` (prototypes or stored images) owned by
    task ``owner[j]``; a task with no key scores ``-inf``."""
    similarity = features @ keys.t()  # [B, K]
    scores = similarity.new_full((features.shape[0], tasks), float("-inf"))
    if method == "prototype":
        return scores.scatter_reduce(1, owner.expand_as(similarity), similarity, reduce="amax")
    for t in range(tasks):  # per task: the mean of its k best similarities
        mine = similarity[:, owner == t]
        if mine.shape[1]:
            scores[:, t] = mine.topk(min(KNN_K, mine.shape[1]), dim=1).values.mean(1)
    return scores


def _method_keys(entry: RoutingEntry, method: RoutingMethod) -> torch.Tensor:
    return entry.prototypes if method == "prototype" else entry.features.float()


def build_entry(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor | None,
    *,
    depth: float,
    seed: int = 0,
) -> RoutingEntry:
    """A task's entry from its frozen features (unit rows). Without val images, the thresholds come from the
    training images themselves, each scored against the others (leave-one-out)."""
    if train_features.shape[0] == 0:
        raise DataError("routing needs at least one training image")
    keep = torch.arange(train_features.shape[0])
    if keep.numel() > MAX_STORED:
        keep = torch.randperm(keep.numel(), generator=torch.Generator().manual_seed(seed))[:MAX_STORED].sort().values
    entry = RoutingEntry(train_features[keep].half().cpu(), train_labels[keep].long().cpu(), {}, depth)
    thresholds: dict[str, float] = {}
    for method in get_args(RoutingMethod):
        keys = _method_keys(entry, method)
        owner = torch.zeros(keys.shape[0], dtype=torch.long)
        if val_features is not None and val_features.shape[0]:
            scores = _task_scores(method, val_features.float().cpu(), keys, owner, 1)[:, 0]
        else:
            scores = _leave_one_out(method, entry)
        thresholds[method] = float(torch.quantile(scores, ACCEPT_QUANTILE)) if scores.numel() else -1.0
    return RoutingEntry(entry.features, entry.labels, thresholds, depth)


def _leave_one_out(method: RoutingMethod, entry: RoutingEntry) -> torch.Tensor:
    features = entry.features.float()
    similarity = features @ features.t()
    similarity.fill_diagonal_(float("-inf"))
    if features.shape[0] < 2:
        return torch.empty(0)
    if method == "knn":
        return similarity.topk(min(KNN_K, features.shape[0] - 1), dim=1).values.mean(1)
    return similarity.max(1).values


def entry_payload(entry: RoutingEntry) -> bytes:
    """An entry as safetensors bytes (the registry stores these)."""
    metadata = {"thresholds": json.dumps(entry.thresholds), "depth": repr(entry.depth)}
    tensors = {"features": entry.features.contiguous(), "labels": entry.labels.contiguous()}
    return safetensors.torch.save(tensors, metadata=metadata)


def entry_from_payload(payload: bytes, task: str) -> RoutingEntry:
    """Read an entry back, checking what a damaged or foreign payload would break."""
    try:
        tensors = safetensors.torch.load(payload)
        metadata = _metadata(payload)
        thresholds = {str(k): float(v) for k, v in json.loads(metadata["thresholds"]).items()}
        depth = float(metadata["depth"])
        features, labels = tensors["features"], tensors["labels"]
    except Exception as e:  # safetensors, json and key errors alike mean the same: unreadable
        raise SSFTasksError(f"the routing entry of task '{task}' cannot be read: {e}") from e
    if features.ndim != 2 or labels.shape != features.shape[:1] or not torch.isfinite(features.float()).all():
        raise SSFTasksError(f"the routing entry of task '{task}' is malformed")
    return RoutingEntry(features, labels, thresholds, depth)


def _metadata(payload: bytes) -> dict[str, str]:
    size = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + size]).get("__metadata__", {})


class Router:
    """The routing entries of the tasks one model serves, stacked for one matrix product per batch.

    Args:
        entries: Task name -> its entry; every entry must have the same feature width and depth.
        method: ``prototype`` or ``knn``.
        device: Where the stacked keys live (the model's device).
    """

    def __init__(self, entries: Mapping[str, RoutingEntry], method: RoutingMethod, device: torch.device) -> None:
        if method not in get_args(RoutingMethod):
            raise DataError(f"routing method must be one of {', '.join(get_args(RoutingMethod))}, got '{method}'")
        self.method = method
        self.tasks: list[str] = sorted(entries)
        depths = {entries[t].depth for t in self.tasks}
        if len(depths) > 1:
            raise SSFTasksError(f"routing entries of different depths cannot be mixed: {sorted(depths)}")
        self.depth = depths.pop() if depths else DEFAULT_DEPTH
        keys = [_method_keys(entries[t], method) for t in self.tasks]
        widths = {k.shape[1] for k in keys}
        if len(widths) > 1:
            raise SSFTasksError(f"routing entries of different feature widths cannot be mixed: {sorted(widths)}")
        self.keys = torch.cat(keys).to(device) if keys else torch.zeros(0, 0, device=device)
        self.owner = (
            torch.cat([torch.full((k.shape[0],), i, dtype=torch.long) for i, k in enumerate(keys)]).to(device)
            if keys
            else torch.zeros(0, dtype=torch.long, device=device)
        )
        self.thresholds = torch.tensor([entries[t].thresholds[method] for t in self.tasks], device=device)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Every task's score ``[B, tasks]`` for unit ``features`` ``[B, D]``."""
        return _task_scores(self.method, features.float(), self.keys, self.owner, len(self.tasks))

    def route(self, features: torch.Tensor) -> list[tuple[str, float]]:
        """Per image, ``(task, score)``: the best task, or :data:`NO_TASK` when its score is below its threshold."""
        if not self.tasks:
            return [(NO_TASK, 0.0)] * features.shape[0]
        best, index = self.scores(features).max(1)
        accepted = best >= self.thresholds[index]
        return [
            (self.tasks[i] if ok else NO_TASK, float(s))
            for i, ok, s in zip(index.tolist(), accepted.tolist(), best.tolist(), strict=True)
        ]

    def __len__(self) -> int:
        return len(self.tasks)
