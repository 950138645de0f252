"""Accuracy of SSF against the usual ways to adapt a frozen backbone, every method under one protocol.

The protocol is VTAB-1k's: for each dataset (``train/``, ``val/``, ``test/`` ImageFolder splits) and each method,
the method's one hyper-parameter is chosen on ``val/`` from a small grid (training on ``train/``, scoring the last
epoch), then the method is trained again on ``train/`` + ``val/`` with the chosen value, once per seed, and scored
by top-1 on ``test/``. The test split is never seen before the final runs.

The methods, all on the same frozen-weights copy, the same transforms (``catalog.transform``, as ``task add`` uses)
and the same schedule (AdamW, linear warmup then cosine decay per step, bf16 autocast on GPU):

* ``linear``: a linear probe, L2-regularised logistic regression on the frozen pre-logit features, fitted to
  convergence with L-BFGS (full batch, deterministic); its grid is the L2 strength, not a learning rate.
* ``bitfit``: every bias of the backbone, plus a linear head.
* ``full``: every parameter of the backbone, plus a linear head.
* ``lora``: PEFT LoRA r=8 on the Linear layers named qkv, proj, fc1 and fc2 (ViT blocks), plus a linear head; a row
  says why when PEFT is not installed or the backbone has no such layers.
* ``ssf``: ``ssf_tasks.training_job.train_and_store``, the code ``task add`` runs, in a registry of the run's own
  (so the user's registry never sees the runs); its parameter count is read back from the stored task.
* ``ssf-defaults``: what ``task add`` does with no flags (no search, trained on ``train/`` alone, best epoch on
  ``val/``), 3 seeds: the row the linear probe + 3 points target is about.
* :data:`ABLATIONS`: ``ssf`` with one change each (scale or shift only, attention or MLP sites only, identity
  initialisation, a random head), under the same protocol.

Trainable parameters are counted from what each method's optimiser actually receives (for SSF, from the stored
payload), so a method that trains more or less than it claims shows it in the table.
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from ssf_tasks import registry
from ssf_tasks.backbones import create_backbone, describe_weights, fingerprint
from ssf_tasks.catalog import check_input_size, load_backbone, transform
from ssf_tasks.config import BackboneRecord, TrainConfig
from ssf_tasks.data import SPLITS, DatasetSplits, ImageDataset, load_splits
from ssf_tasks.errors import DataError, TrainingError
from ssf_tasks.taskfiles import task_tensors
from ssf_tasks.train import resolve_device
from ssf_tasks.training_job import train_and_store

__all__ = [
    "ABLATIONS",
    "DEFAULT_GRIDS",
    "LORA_RANK",
    "LORA_TARGETS",
    "METHODS",
    "backbone_record",
    "bench_accuracy",
    "lora_targets",
    "markdown_table",
]

METHODS: tuple[str, ...] = ("linear", "bitfit", "full", "lora", "ssf", "ssf-defaults")
# SSF variants in the spirit of the paper's ablations: each is ``ssf`` (same grid, same protocol) with one change.
ABLATIONS: dict[str, dict[str, Any]] = {
    "ssf-scale": {"adapt": "scale"},
    "ssf-shift": {"adapt": "shift"},
    "ssf-attn": {"train_sites": ["*.attn.*"]},
    "ssf-mlp": {"train_sites": ["*.mlp.*"]},
    "ssf-identity-init": {"sigma": 0.0},
    "ssf-random-head": {"head_init": "random"},
}
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {
    "linear": (1e-4, 1e-3, 1e-2, 1e-1, 1.0),  # L2 strength on standardised features
    "bitfit": (1e-3, 3e-3, 1e-2),
    "full": (1e-5, 3e-5, 1e-4),
    "lora": (3e-4, 1e-3, 3e-3),
    "ssf": (1e-3, 5e-3, 1e-2),
}
LORA_TARGETS: frozenset[str] = frozenset({"qkv", "proj", "fc1", "fc2"})
LORA_RANK = 8

Row = dict[str, Any]
Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def backbone_record(timm_name: str, weights: str | os.PathLike[str] | None, name: str = "bench") -> BackboneRecord:
    """A backbone record for a timm model and its weights, as ``backbone add`` would store it (not stored here)."""
    module = create_backbone(timm_name, weights)
    return BackboneRecord(
        name=name,
        timm_name=timm_name,
        weights_source=describe_weights(weights, timm_name),
        fingerprint=fingerprint(module),
        num_features=int(getattr(module, "head_hidden_size", None) or module.num_features),
    )


def lora_targets(module: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers LoRA adapts: those called qkv, proj, fc1 or fc2 (a ViT block's)."""
    return [
        name
        for name, child in module.named_modules()
        if isinstance(child, nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS
    ]


# --------------------------------------------------------------------------------------------------------
# The baselines: one classifier (backbone + linear head), one training loop, one evaluation
# --------------------------------------------------------------------------------------------------------


class _Classifier(nn.Module):
    """A timm backbone (``num_classes=0``: it returns pre-logit features) and a linear head."""

    def __init__(self, backbone: nn.Module, num_features: int, num_classes: int, *, backbone_trains: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.backbone_trains = backbone_trains

    def train(self, mode: bool = True) -> _Classifier:
        # A frozen backbone keeps its BatchNorm statistics and has no dropout, as SSF's backbone does.
        super().train(mode)
        if not self.backbone_trains:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _loader(dataset: Dataset, config: TrainConfig, device: torch.device, *, shuffle: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle,
        num_workers=config.num_workers,
        generator=torch.Generator().manual_seed(config.seed),
        pin_memory=device.type == "cuda",
    )


def _train(model: nn.Module, params: list[nn.Parameter], dataset: Dataset, config: TrainConfig) -> None:
    """The schedule of ``ssf_tasks.train.train_task`` (AdamW, warmup then cosine per step), keeping the last epoch.

    Raises:
        TrainingError: the loss became non-finite (this learning rate diverges).
    """
    device = resolve_device(config.device)
    model.to(device)
    loader = _loader(dataset, config, device, shuffle=True)
    steps_per_epoch = len(loader)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps_per_epoch * config.epochs,
        lr_min=config.lr * 0.01,
        warmup_t=config.warmup_epochs * steps_per_epoch,
        warmup_lr_init=config.lr * 0.01,
        t_in_epochs=False,
    )
    step = 0
    model.train()
    for _ in range(config.epochs):
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with _autocast(device, config.amp):
                loss = F.cross_entropy(model(images).float(), labels)
            if not math.isfinite(loss.item()):
                raise TrainingError(f"the loss became {loss.item()} at lr {config.lr:g}", field="lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(step)
    model.eval()


@torch.no_grad()
def _top1(model: nn.Module, dataset: Dataset, config: TrainConfig) -> float:
    device = resolve_device(config.device)
    model.to(device).eval()
    correct = total = 0
    for images, labels in _loader(dataset, config, device, shuffle=False):
        images, labels = images.to(device), labels.to(device)
        with _autocast(device, config.amp):
            logits = model(images)
        correct += int((logits.argmax(1) == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def _gradient_method(
    method: str, frozen: nn.Module, num_features: int, num_classes: int, config: TrainConfig
) -> tuple[nn.Module, list[nn.Parameter]]:
    """A fresh classifier for ``method`` (a copy of ``frozen``) and the parameters its optimiser gets."""
    torch.manual_seed(config.seed)
    backbone = copy.deepcopy(frozen)
    backbone.requires_grad_(method == "full")
    if method == "bitfit":
        for name, param in backbone.named_parameters():
            param.requires_grad_(name.rsplit(".", 1)[-1] == "bias")
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=lora_targets(backbone))
        backbone = inject_adapter_in_model(lora, backbone)
        for name, param in backbone.named_parameters():
            param.requires_grad_("lora_" in name)
    model = _Classifier(backbone, num_features, num_classes, backbone_trains=method == "full")
    return model, [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------------
# The linear probe: logistic regression on frozen features
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def _features(backbone: nn.Module, dataset: Dataset, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logit features (float32, on the CPU) and labels of a whole split."""
    device = resolve_device(config.device)
    backbone.to(device).eval()
    features, labels = [], []
    for images, batch_labels in _loader(dataset, config, device, shuffle=False):
        with _autocast(device, config.amp):
            features.append(backbone(images.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(features), torch.cat(labels)


def _logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float) -> nn.Linear:
    """Multinomial logistic regression (mean cross-entropy + ``l2 / 2 * ||W||²`` on standardised features), fitted to
    convergence with L-BFGS and returned as one ``nn.Linear`` on the raw features (the standardisation folded in)."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    z = (features - mean) / std
    weight = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=1000, history_size=20, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(weight / std)
        head.bias.copy_(bias - (weight / std) @ mean)
    return head


def _probe_top1(head: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(features).argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------------------------------------
# SSF: the code `task add` runs, on ImageFolder views of the splits
# --------------------------------------------------------------------------------------------------------


def _link_view(root: Path, splits: DatasetSplits, layout: dict[str, Sequence[str]]) -> Path:
    """An ImageFolder tree at ``root`` of symbolic links: ``layout`` maps a split of the view to the dataset's splits
    it holds (``{"train": ["train", "val"], "test": ["test"]}``); file names keep their suffix and stay unique.
    A view already there is reused (SSF and its variants share the dataset's views)."""
    if root.exists():
        return root
    for view_split, sources in layout.items():
        for source in sources:
            for i, sample in enumerate(splits.split(source)):
                folder = root / view_split / splits.class_names[sample.label]
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{source}-{i}{sample.path.suffix}").symlink_to(sample.path.resolve())
    return root


@dataclass
class _SSFRuns:
    """Runs of ``train_and_store`` in a registry of the benchmark's own, one stored task per run."""

    engine: Any
    backbone: str
    count: int = 0

    def run(self, data: Path, config: TrainConfig) -> tuple[float | None, float | None, int, float]:
        """(last epoch's val top-1, test top-1, stored parameters, training seconds) of one ``task add``."""
        self.count += 1
        name = f"run-{self.count}"
        _, result = train_and_store(self.engine, name, self.backbone, data, config)
        with Session(self.engine) as s:
            stored = task_tensors(registry.get_task_payload(s, name), name)
        val = result.history[-1].get("val_top1") if result.history else None
        trained = sum(t.numel() for key, t in stored.items() if not _pinned(key, t))
        return val, result.test_top1, trained, result.train_seconds


def _pinned(key: str, tensor: torch.Tensor) -> bool:
    """A γ exactly 1 or a β exactly 0 everywhere: a table the run did not train (``adapt``, ``train_sites``).

    Trained tables start from noise (or, with σ = 0, move off identity at the first step), so none is exactly
    identity after a run."""
    if key.endswith(".ssf_scale"):
        return bool(torch.all(tensor == 1))
    return key.endswith(".ssf_shift") and bool(torch.all(tensor == 0))


# --------------------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------------------


def _score(top1: float | None) -> str:
    return "diverged" if top1 is None else f"{top1:.4f}"


def _summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _check_splits(splits: DatasetSplits) -> None:
    for split in SPLITS:
        if not splits.split(split):
            raise DataError(f"dataset {splits.root} has no {split}/ split (the protocol needs train/, val/ and test/)")


def bench_accuracy(
    datasets: Sequence[str | os.PathLike[str]],
    backbone: BackboneRecord,
    config: TrainConfig,
    *,
    methods: Sequence[str] = METHODS,
    seeds: int = 3,
    grids: dict[str, Sequence[float]] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    log: Log = _stderr,
) -> list[Row]:
    """Every method on every dataset under one protocol; one row per (dataset, method).

    Args:
        datasets: ImageFolder trees with ``train/``, ``val/`` and ``test/``.
        backbone: The backbone (a registry record: its weights are checked against the fingerprint).
        config: What every run shares (epochs, batch size, weight decay, warmup, input size, device, ...); its
            ``lr`` and ``seed`` are replaced by the grid's and the seeds' values.
        methods: Which of :data:`METHODS` to run, in this order.
        seeds: Final runs per method (seeds ``config.seed``, ``config.seed + 1``, ...).
        grids: Hyper-parameter grids per method (learning rates; L2 strengths for ``linear``), overriding
            :data:`DEFAULT_GRIDS`.
        workdir: Where the SSF runs' registry and dataset views go (a temporary folder by default).
        log: Called with one line per finished run.

    Returns:
        Rows with the chosen hyper-parameter, the val top-1 of every grid value, the test top-1 of every seed with
        their mean and standard deviation, the trainable parameter count and the mean training seconds per run.
    """
    unknown = [m for m in methods if m not in METHODS and m not in ABLATIONS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r} (use {', '.join([*METHODS, *ABLATIONS])})")
    grids = {**DEFAULT_GRIDS, **(grids or {})}
    for method in methods:
        grids.setdefault(method, grids["ssf"])  # SSF's variants search SSF's grid; ssf-defaults searches nothing
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ssf-bench-accuracy-") as tmp:
            return bench_accuracy(
                datasets, backbone, config, methods=methods, seeds=seeds, grids=grids, workdir=tmp, log=log
            )
    check_input_size(load_backbone(backbone), backbone, config)  # before any run, not in the middle of one
    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    engine = registry.open_registry(f"sqlite:///{root.resolve() / 'registry.db'}")
    try:
        with registry.transaction(engine, "registering the benchmark's backbone") as s:
            registry.add_backbone(s, backbone)
        ssf = _SSFRuns(engine, backbone.name)
        rows = []
        for index, data in enumerate(datasets):
            splits = load_splits(data)
            _check_splits(splits)
            for method in methods:
                row = _bench_method(method, splits, index, backbone, config, seeds, grids[method], root, ssf, log)
                rows.append(row)
        return rows
    finally:
        engine.dispose()


def _bench_method(
    method: str,
    splits: DatasetSplits,
    index: int,
    record: BackboneRecord,
    config: TrainConfig,
    seeds: int,
    grid: Sequence[float],
    root: Path,
    ssf: _SSFRuns,
    log: Log,
) -> Row:
    """One row: select on val, refit on train + val per seed, test."""
    row: Row = {
        "dataset": splits.root.name,
        "path": str(splits.root),
        "method": method,
        "backbone": record.name,
        "timm_name": record.timm_name,
        "classes": splits.num_classes,
        "images": {split: len(splits.split(split)) for split in SPLITS},
        "epochs": config.epochs,
        "hparam": "l2" if method == "linear" else "lr",
        "grid": {},
        "chosen": None,
        "val_top1": None,
        "test_top1": [],
        "test_top1_mean": None,
        "test_top1_std": None,
        "trainable_params": None,
        "seconds_per_run": None,
        "seeds": 0,
        "note": "",
    }
    frozen = load_backbone(record)
    if method == "lora":
        if not lora_targets(frozen):
            row["note"] = "skipped: the backbone has no Linear layers named qkv, proj, fc1 or fc2"
            return row
        try:
            import peft  # noqa: F401
        except ImportError:
            row["note"] = "skipped: peft not installed"
            return row
    num_features, num_classes = record.num_features, splits.num_classes
    train_tf = transform(frozen, record, config, train=True)
    eval_tf = transform(frozen, record, config, train=False)
    train = ImageDataset(splits.train, train_tf)
    val = ImageDataset(splits.val, eval_tf)
    train_val = ImageDataset(splits.train + splits.val, train_tf)
    test = ImageDataset(splits.test, eval_tf)
    seed_values = [config.seed + i for i in range(seeds if method != "linear" else 1)]
    where = f"{splits.root.name} {method}"

    if method == "linear":
        # Deterministic (a convex problem solved to convergence): one run stands for every seed.
        started = time.perf_counter()
        train_images = ImageDataset(splits.train, eval_tf)  # features of unaugmented images
        features = {name: _features(frozen, data, config) for name, data in (("train", train_images), ("val", val))}
        extract = time.perf_counter() - started
        for l2 in grid:
            head = _logistic_regression(*features["train"], num_classes, l2)
            row["grid"][f"{l2:g}"] = _probe_top1(head, *features["val"])
        chosen = _choose(row, grid)
        started = time.perf_counter()
        fit = (
            torch.cat([features["train"][0], features["val"][0]]),
            torch.cat([features["train"][1], features["val"][1]]),
        )
        head = _logistic_regression(*fit, num_classes, chosen)
        accuracy = _probe_top1(head, *_features(frozen, test, config))
        seconds = [extract + time.perf_counter() - started]
        row["test_top1"], row["trainable_params"] = [accuracy], sum(p.numel() for p in head.parameters())
        row["note"] = "logistic regression (L-BFGS, deterministic: one run)"
        log(f"{where}: l2 {chosen:g}, test top-1 {accuracy:.4f}")
    elif method == "ssf-defaults":
        # What `task add NAME --data DATASET` does with no flags: TrainConfig's defaults, no search, the dataset
        # as it is (train/ trains, val/ picks the best epoch, test/ scores). Only where it runs and the input size
        # come from `config`.
        as_is = _link_view(root / "views" / f"{index}-{splits.root.name}" / "as-is", splits, {s: [s] for s in SPLITS})
        defaults = TrainConfig(
            device=config.device, amp=config.amp, num_workers=config.num_workers, input_size=config.input_size
        )
        row["chosen"], row["epochs"] = defaults.lr, defaults.epochs
        row["note"] = f"task add defaults: {defaults.epochs} epochs, lr {defaults.lr:g}, no search, train/ only"
        seconds, vals = [], []
        for seed in seed_values:
            val_top1, test_top1, params, train_seconds = ssf.run(as_is, defaults.model_copy(update={"seed": seed}))
            vals.append(val_top1)
            row["test_top1"].append(test_top1)
            row["trainable_params"] = params
            seconds.append(train_seconds)
            scores = f"val top-1 {_score(val_top1)}, test top-1 {test_top1:.4f}"
            log(f"{where}: seed {seed}, {scores} ({train_seconds:.1f} s)")
        row["val_top1"] = statistics.fmean(vals)  # the last epoch's, as for every other row
    elif method == "ssf" or method in ABLATIONS:
        config = config.model_copy(update=ABLATIONS.get(method, {}))
        views = root / "views" / f"{index}-{splits.root.name}"
        select = _link_view(views / "select", splits, {"train": ["train"], "val": ["val"]})
        refit = _link_view(views / "refit", splits, {"train": ["train", "val"], "test": ["test"]})
        for lr in grid:
            try:
                val_top1, *_ = ssf.run(select, config.model_copy(update={"lr": lr, "seed": seed_values[0]}))
            except TrainingError:
                val_top1 = None
            row["grid"][f"{lr:g}"] = val_top1
            log(f"{where}: lr {lr:g}, val top-1 {_score(val_top1)}")
        chosen = _choose(row, grid)
        seconds = []
        for seed in seed_values:
            _, test_top1, params, train_seconds = ssf.run(refit, config.model_copy(update={"lr": chosen, "seed": seed}))
            row["test_top1"].append(test_top1)
            row["trainable_params"] = params
            seconds.append(train_seconds)
            log(f"{where}: lr {chosen:g}, seed {seed}, test top-1 {test_top1:.4f} ({train_seconds:.1f} s)")
    else:
        for lr in grid:
            run_config = config.model_copy(update={"lr": lr, "seed": seed_values[0]})
            model, params = _gradient_method(method, frozen, num_features, num_classes, run_config)
            try:
                _train(model, params, train, run_config)
                row["grid"][f"{lr:g}"] = _top1(model, val, run_config)
            except TrainingError:
                row["grid"][f"{lr:g}"] = None
            log(f"{where}: lr {lr:g}, val top-1 {_score(row['grid'][f'{lr:g}'])}")
        chosen = _choose(row, grid)
        seconds = []
        for seed in seed_values:
            run_config = config.model_copy(update={"lr": chosen, "seed": seed})
            model, params = _gradient_method(method, frozen, num_features, num_classes, run_config)
            started = time.perf_counter()
            _train(model, params, train_val, run_config)
            accuracy = _top1(model, test, run_config)
            seconds.append(time.perf_counter() - started)
            row["test_top1"].append(accuracy)
            row["trainable_params"] = sum(p.numel() for p in params)
            log(f"{where}: lr {chosen:g}, seed {seed}, test top-1 {accuracy:.4f} ({seconds[-1]:.1f} s)")
    row["test_top1_mean"], row["test_top1_std"] = _summary(row["test_top1"])
    row["seconds_per_run"] = statistics.fmean(seconds)
    row["seeds"] = len(row["test_top1"])
    return row


def _choose(row: Row, grid: Sequence[float]) -> float:
    """The grid value with the best val top-1 (the first of equals); every value diverging is an error."""
    scores = [(row["grid"][f"{value:g}"], value) for value in grid if row["grid"][f"{value:g}"] is not None]
    if not scores:
        raise TrainingError(f"{row['dataset']} {row['method']}: every value of the grid diverged", field="lr")
    best = max(score for score, _ in scores)
    chosen = next(value for score, value in scores if score == best)
    row["chosen"], row["val_top1"] = chosen, best
    return chosen


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as one markdown table: test top-1 as mean ± std over seeds, in percent."""
    lines = [
        "| dataset | method | trainable params | chosen | val top-1 | test top-1 | seeds | s / run | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["test_top1_mean"] is None:
            cells = [r["dataset"], r["method"], "", "", "", "", "0", "", r["note"]]
        else:
            cells = [
                r["dataset"],
                r["method"],
                f"{r['trainable_params']:,}",
                f"{r['hparam']} {r['chosen']:g}",
                f"{100 * r['val_top1']:.1f}",
                f"{100 * r['test_top1_mean']:.1f} ± {100 * r['test_top1_std']:.1f}",
                str(r["seeds"]),
                f"{r['seconds_per_run']:.1f}",
                r["note"],
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
