"""Warm start against cold start: does a task learn faster from a related task's γ/β (``task add --init-from``)?

Every source dataset is first registered as a task (``task add`` with the given config). Then, for each pair
SOURCE → TARGET, TARGET is trained once with ``--init-from auto`` (which stored task does it pick?), and then cold
and warm (``--init-from SOURCE``) with the same seeds. Every run is ``ssf_tasks.training_job.train_and_store``, the
code ``task add`` runs, in a registry of the benchmark's own.

Reported per pair: val top-1 after each epoch (mean over seeds; epoch 0 is the probe head), the first epoch at
which the cold and the warm mean curves reach the best point of the cold mean curve, and test top-1 (of each run's
best val epoch, as ``task add`` stores it), mean ± std.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ssf_tasks import registry
from ssf_tasks.config import BackboneRecord, TrainConfig
from ssf_tasks.data import load_splits
from ssf_tasks.errors import DataError
from ssf_tasks.training_job import train_and_store

__all__ = ["bench_warm_start", "markdown_table"]

Row = dict[str, Any]
Log = Callable[[str], None]


def _name(path: str | os.PathLike[str]) -> str:
    return Path(path).resolve().name.lower().replace(" ", "-")


def _curve(history: list[dict[str, float]]) -> list[float]:
    return [epoch["val_top1"] for epoch in history if "val_top1" in epoch]


def _first_epoch_reaching(curve: list[float], level: float) -> int | None:
    return next((epoch for epoch, value in enumerate(curve) if value >= level), None)


def bench_warm_start(
    pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    backbone: BackboneRecord,
    config: TrainConfig,
    *,
    seeds: int = 3,
    workdir: str | os.PathLike[str] | None = None,
    log: Log = print,
) -> list[Row]:
    """One row per (source, target) pair; see the module docstring for the protocol.

    Args:
        pairs: (source, target) ImageFolder trees; a target needs ``val/`` (the curves are val top-1).
        backbone: The backbone every task trains on.
        config: ``task add``'s settings for every run (its ``seed`` is the first seed; ``init_from`` is ignored).
        seeds: Cold and warm runs per pair.
        workdir: Where the benchmark's registry goes (a temporary folder by default).
        log: Called with one line per finished run.
    """
    for _, target in pairs:  # before any run: the curves are val top-1
        if not load_splits(target).val:
            raise DataError(f"{target} has no val/ split: the warm-start curves are val top-1")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ssf-bench-warm-start-") as tmp:
            return bench_warm_start(pairs, backbone, config, seeds=seeds, workdir=tmp, log=log)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    engine = registry.open_registry(f"sqlite:///{Path(workdir).resolve() / 'registry.db'}")
    try:
        with registry.transaction(engine, "registering the benchmark's backbone") as s:
            registry.add_backbone(s, backbone)
        config = config.model_copy(update={"init_from": None})

        def task_add(name: str, data: str | os.PathLike[str], **update: Any) -> tuple[Any, Any]:
            record, result = train_and_store(engine, name, backbone.name, data, config.model_copy(update=update))
            log(
                f"{name}: val top-1 per epoch {[round(v, 3) for v in _curve(result.history)]}, "
                f"test top-1 {result.test_top1}, {result.train_seconds:.1f} s"
            )
            return record, result

        sources: dict[str, str] = {}
        for source, _ in pairs:
            if _name(source) not in sources:
                sources[_name(source)] = str(source)
                task_add(_name(source), source)
        auto_choice = {}
        for source, target in pairs:  # before any target is stored: auto chooses among the sources only
            key = (_name(source), _name(target))
            if key[1] not in auto_choice:
                record, _ = task_add(f"{key[1]}-auto", target, init_from="auto")
                auto_choice[key[1]] = record.train_config.init_from
        rows = []
        for source, target in pairs:
            src, dst = _name(source), _name(target)
            runs: dict[str, list[Any]] = {"cold": [], "warm": []}
            for offset in range(seeds):
                seed = config.seed + offset
                runs["cold"].append(task_add(f"{dst}-cold-{src}-{seed}", target, seed=seed)[1])
                runs["warm"].append(task_add(f"{dst}-warm-{src}-{seed}", target, seed=seed, init_from=src)[1])
            curves = {how: [_curve(r.history) for r in results] for how, results in runs.items()}
            mean_curves = {how: [statistics.fmean(v) for v in zip(*c, strict=True)] for how, c in curves.items()}
            cold_best = max(mean_curves["cold"])
            row: Row = {
                "source": src,
                "target": dst,
                "source_path": sources[src],
                "target_path": str(target),
                "epochs": config.epochs,
                "seeds": seeds,
                "auto_init_from": auto_choice[dst],
                "cold_best_val_top1": cold_best,
            }
            for how, results in runs.items():
                tests = [r.test_top1 for r in results]
                row[f"{how}_val_curve"] = mean_curves[how]
                row[f"{how}_epochs_to_cold_best"] = _first_epoch_reaching(mean_curves[how], cold_best)
                row[f"{how}_test_top1"] = tests
                row[f"{how}_test_top1_mean"] = statistics.fmean(tests) if None not in tests else None
                row[f"{how}_test_top1_std"] = statistics.stdev(tests) if len(tests) > 1 and None not in tests else 0.0
                row[f"{how}_train_seconds"] = statistics.fmean(r.train_seconds for r in results)
            rows.append(row)
        return rows
    finally:
        engine.dispose()


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _epochs(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def markdown_table(rows: Sequence[Row]) -> str:
    """Epochs to the cold runs' best val top-1 and test top-1, cold against warm, and what ``auto`` picked."""
    lines = [
        "| source → target | `--init-from auto` picks | epochs to cold's best val: cold / warm "
        "| val top-1 after epoch 1: cold / warm | test top-1 cold | test top-1 warm |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        first = (row["cold_val_curve"][1:2] or [None])[0], (row["warm_val_curve"][1:2] or [None])[0]
        lines.append(
            f"| {row['source']} → {row['target']} | {row['auto_init_from'] or 'none (cold)'} "
            f"| {_epochs(row['cold_epochs_to_cold_best'])} / {_epochs(row['warm_epochs_to_cold_best'])} "
            f"| {_pct(first[0])} / {_pct(first[1])} "
            f"| {_pct(row['cold_test_top1_mean'])} ± {_pct(row['cold_test_top1_std'])} "
            f"| {_pct(row['warm_test_top1_mean'])} ± {_pct(row['warm_test_top1_std'])} |"
        )
    return "\n".join(lines)
