"""Train one task's γ/β and head on a frozen backbone, and evaluate a task.

The loop is deliberately plain: AdamW over the task's rows only (``MultiTaskSSF.isolate_tasks``), linear
warmup then cosine decay per step (timm's scheduler), bf16 autocast on GPU, evaluation on val every epoch
keeping the best epoch's state, optional early stop. A non-finite loss or Ctrl-C stops training with a
clear error and leaves the model exactly as it was before the run.

By default the head starts as a linear probe of the frozen features (:func:`fit_probe_head`), and that starting
point is scored on val as epoch 0: γ/β training starts from the probe's answers rather than from a random head,
and a run never keeps a state that scores below the probe on val.

Given a :class:`~ssf_tasks.data_parallel.DataParallel`, the same loop runs as one rank of a data-parallel run: its
share of every batch, gradients of γ/β and the head averaged over the ranks, val/test top-1 summed over shards.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from timm.scheduler import CosineLRScheduler
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from .config import TrainConfig
from .data_parallel import DataParallel
from .errors import TrainingError, TrainingInterrupted
from .model import MultiTaskSSF

__all__ = ["TrainProgress", "TrainResult", "evaluate", "fit_probe_head", "resolve_device", "train_task"]


@dataclass(frozen=True)
class TrainProgress:
    """One progress report: after every training step (``phase="train"``) and every evaluation."""

    phase: str
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    images_per_second: float


@dataclass
class TrainResult:
    """What a run produced; the trained (best) state is already in the model."""

    best_epoch: int
    epochs_run: int
    val_top1: float | None
    test_top1: float | None
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    """``auto`` means CUDA when available; asking for CUDA without one is an error, not a silent CPU run."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("device cuda was asked for, but no CUDA device is available", field="device")
    return torch.device(device)


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _loader(dataset: Dataset, config: TrainConfig, *, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        generator=generator,
        drop_last=False,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def evaluate(
    model: MultiTaskSSF,
    name: str,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    amp: bool = True,
    num_workers: int = 0,
    parallel: DataParallel | None = None,
) -> float:
    """Top-1 accuracy of task ``name`` on ``dataset`` (with ``parallel``: each rank a shard, counts summed)."""
    device = resolve_device(device) if isinstance(device, str) else device
    model.to(device).eval()
    config = TrainConfig(batch_size=batch_size, num_workers=num_workers)
    correct = total = 0
    k = model.num_classes(name)
    for images, labels in _loader(parallel.shard(dataset) if parallel else dataset, config, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        with _autocast(device, amp):
            logits = model(images, name)[:, :k]
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    if parallel is not None:
        correct, total = parallel.sum(correct, total)
    return correct / max(total, 1)


PROBE_L2 = (1e-3, 1e-2, 1e-1)
"""L2 weights tried for the probe head; the best on val wins (the middle one without val)."""


@torch.no_grad()
def _features(
    model: MultiTaskSSF,
    name: str,
    dataset: Dataset,
    config: TrainConfig,
    device: torch.device,
    parallel: DataParallel | None = None,
):
    model.eval()
    features = [torch.empty(0, model.num_features, device=device)]  # a rank's shard may be empty
    labels = [torch.empty(0, dtype=torch.long, device=device)]
    for images, y in _loader(parallel.shard(dataset) if parallel else dataset, config, shuffle=False):
        with _autocast(device, config.amp):
            features.append(model.forward_features(images.to(device), name).float())
        labels.append(y.to(device))
    x, y = torch.cat(features), torch.cat(labels)
    if parallel is not None:  # every rank gets every image's features, in the dataset's order
        x, y = parallel.gather(x, len(dataset)), parallel.gather(y, len(dataset))
    return x, y


def _logistic_regression(x: torch.Tensor, y: torch.Tensor, k: int, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight [k, D], bias [k])`` minimising cross-entropy + ``l2 * |weight|²`` by full-batch L-BFGS."""
    weight = torch.zeros(k, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(k, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.t() + bias, y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_probe_head(
    model: MultiTaskSSF,
    name: str,
    train_set: Dataset,
    config: TrainConfig,
    *,
    val_set: Dataset | None = None,
    device: torch.device | None = None,
    parallel: DataParallel | None = None,
) -> float | None:
    """Set task ``name``'s head to a multinomial logistic regression on the features its γ/β give now.

    Full-batch L-BFGS on cross-entropy plus an L2 penalty; with a val set each of :data:`PROBE_L2` is fitted and
    the best on val kept. Returns the chosen probe's val top-1 (``None`` without val, or when the features are not
    finite and the head is left as it was). With ``parallel``, each rank computes a shard of the features and every
    rank fits on all of them.
    """
    device = device or resolve_device(config.device)
    x, y = _features(model, name, train_set, config, device, parallel)
    if not bool(torch.isfinite(x).all()):
        return None  # the head stays as it is; the training loop stops at the non-finite loss with its message
    has_val = val_set is not None and len(val_set) > 0
    val = _features(model, name, val_set, config, device, parallel) if has_val else None
    k = model.num_classes(name)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for l2 in PROBE_L2 if val is not None else PROBE_L2[1:2]:
        weight, bias = _logistic_regression(x, y, k, l2)
        score = float(((val[0] @ weight.t() + bias).argmax(1) == val[1]).float().mean()) if val is not None else 0.0
        if best is None or score > best[0]:
            best = (score, weight, bias)
    assert best is not None
    t = model.task_index(name)
    with torch.no_grad():
        model.head_weight[t, :k] = best[1].to(model.head_weight)
        model.head_bias[t, :k] = best[2].to(model.head_bias)
    return best[0] if val is not None else None


def train_task(
    model: MultiTaskSSF,
    name: str,
    train_set: Dataset,
    config: TrainConfig,
    *,
    val_set: Dataset | None = None,
    test_set: Dataset | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    parallel: DataParallel | None = None,
) -> TrainResult:
    """Train task ``name`` (already added to ``model``) and leave its best state in the model.

    With ``parallel`` this process is one rank of a data-parallel run (see :mod:`ssf_tasks.data_parallel`): every
    rank calls this with the same arguments, and every rank ends with the same state and result.

    Raises:
        TrainingError: the loss became non-finite (the model is left as before the run).
        TrainingInterrupted: Ctrl-C (the model is left as before the run).
    """
    device = resolve_device(config.device)
    torch.manual_seed(config.seed + (parallel.rank if parallel else 0))  # each rank its own augmentations
    model.to(device)
    if parallel is not None:
        loader = parallel.train_loader(train_set, config)
    else:
        loader = _loader(train_set, config, shuffle=True, seed=config.seed)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * config.epochs
    started = time.perf_counter()
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None

    def score(dataset: Dataset) -> float:
        return evaluate(
            model,
            name,
            dataset,
            batch_size=config.batch_size,
            device=device,
            amp=config.amp,
            num_workers=config.num_workers,
            parallel=parallel,
        )

    stale_epochs = 0
    epoch = 0
    saved = model.task_state_dict(name)  # restored if the run fails or is interrupted
    try:
        pinned = model.pin_to_identity(name, adapt=config.adapt, train_sites=config.train_sites)
        if config.head_init == "probe":
            probe_val = fit_probe_head(
                model, name, train_set, config, val_set=val_set, device=device, parallel=parallel
            )
            if parallel is not None:  # every rank starts from rank 0's probe and agrees on its score
                probe_val = parallel.broadcast_task(model, name, probe_val)
            if probe_val is not None:
                best = (probe_val, 0, model.task_state_dict(name))
                history.append({"epoch": 0.0, "val_top1": probe_val})
        with model.isolate_tasks([name]) as tables:
            params = [t for key, t in zip(model.table_keys(), tables, strict=True) if key not in pinned]
            forward = parallel.wrap(model, name, params) if parallel else partial(model, tasks=name)
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
            scheduler = CosineLRScheduler(
                optimizer,
                t_initial=total_steps,
                lr_min=config.lr * 0.01,
                warmup_t=config.warmup_epochs * steps_per_epoch,
                warmup_lr_init=config.lr * 0.01,
                t_in_epochs=False,
            )
            step = 0
            for epoch in range(1, config.epochs + 1):
                loss, accuracy = _train_epoch(
                    model,
                    forward,
                    name,
                    loader,
                    optimizer,
                    scheduler,
                    config,
                    device,
                    epoch,
                    step,
                    total_steps,
                    progress,
                    parallel,
                )
                step += steps_per_epoch
                record = {"epoch": float(epoch), "loss": loss, "train_top1": accuracy}
                if val_set is not None and len(val_set) > 0:
                    record["val_top1"] = score(val_set)
                    model.train()
                    if progress is not None:
                        progress(
                            TrainProgress("val", epoch, config.epochs, step, total_steps, loss, record["val_top1"], 0.0)
                        )
                history.append(record)
                epoch_score = record.get("val_top1", float(epoch))  # without val, the last epoch is the best
                # A trained state that ties the probe on val is kept: val is small, and training saw more.
                if best is None or epoch_score > best[0] or (best[1] == 0 and epoch_score >= best[0]):
                    best, stale_epochs = (epoch_score, epoch, model.task_state_dict(name)), 0
                else:
                    stale_epochs += 1
                    if config.patience is not None and stale_epochs >= config.patience:
                        break
            model.update_task(name, best[2])
    except KeyboardInterrupt:
        model.update_task(name, saved)
        raise TrainingInterrupted(f"training of {name!r} interrupted at epoch {epoch}; nothing was changed") from None
    except BaseException:
        model.update_task(name, saved)
        raise
    model.eval()
    val_top1 = next((h["val_top1"] for h in history if h["epoch"] == best[1] and "val_top1" in h), None)
    test_top1 = score(test_set) if test_set is not None and len(test_set) > 0 else None
    epochs_run = sum(h["epoch"] > 0 for h in history)
    return TrainResult(best[1], epochs_run, val_top1, test_top1, time.perf_counter() - started, history)


def _train_epoch(
    model, forward, name, loader, optimizer, scheduler, config, device, epoch, step, total_steps, progress, parallel
):
    """One pass over the training set (``forward``: images to logits); returns mean loss and training accuracy."""
    model.train()
    loss_sum = correct = seen = 0.0
    k = model.num_classes(name)
    for images, labels in loader:
        tick = time.perf_counter()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with _autocast(device, config.amp):
            logits = forward(images)[:, :k]
            loss = F.cross_entropy(logits.float(), labels)
        if not math.isfinite(loss.item()):
            raise TrainingError(
                f"training of {name!r} stopped: the loss became {loss.item()} at epoch {epoch}, step {step + 1} "
                f"(try a lower lr); nothing was stored",
                field="lr",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        scheduler.step_update(step)
        batch = labels.numel()
        loss_sum += loss.item() * batch
        correct += float((logits.argmax(1) == labels).sum())
        seen += batch
        if progress is not None:
            rate = batch * (parallel.world if parallel else 1) / max(time.perf_counter() - tick, 1e-9)
            progress(
                TrainProgress("train", epoch, config.epochs, step, total_steps, loss_sum / seen, correct / seen, rate)
            )
    if parallel is not None:  # the epoch's loss and accuracy over every rank's images
        loss_sum, correct, seen = parallel.sum(loss_sum, correct, seen)
    return loss_sum / max(seen, 1), correct / max(seen, 1)
