"""Task-agnostic inference measured: which task, how well, how much it costs (``ssf-tasks bench routing``).

Each dataset (an ImageFolder tree with ``train/``, ``val/``, ``test/``) is registered as a task by the very code
``task add`` runs (so its routing entry is the stored one), then every routing method is scored on the test splits:

* task selection: the share of test images routed to their own task;
* end-to-end top-1 with ``task: auto`` (right task and right label) beside top-1 with the task given;
* false rejection: test images of registered tasks answered ``none``;
* open set: the share of images of unregistered datasets (``--unknown``) answered ``none``;
* cost per image: ``predict`` of the test images with ``auto`` against ``predict`` with the task given (files on disk
  in, predictions out), and the forwards alone on a decoded batch (routing forward + task forward against the task
  forward), both timed in the same run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, get_args

import torch
from sqlalchemy.orm import Session

from ssf_tasks import registry
from ssf_tasks.config import BackboneRecord, TrainConfig
from ssf_tasks.data import load_splits
from ssf_tasks.engine import Predictor
from ssf_tasks.registry import open_registry
from ssf_tasks.routing import AUTO_TASK, NO_TASK, RoutingMethod
from ssf_tasks.training_job import train_and_store

__all__ = ["bench_routing", "markdown_table", "task_name"]

Row = dict[str, Any]
Log = Callable[[str], None]


def task_name(folder: str | Path) -> str:
    """A dataset folder's task name: its folder name, lower-cased, with characters a task name cannot hold as '-'."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(folder).name.lower()).strip("._-")
    return name or "dataset"


def _test_items(folder: str, task: str, limit: int | None) -> list[tuple[Path, str, str]]:
    """``(image, task, label)`` of a dataset's test split (``limit`` of them, spread evenly over the split)."""
    splits = load_splits(folder, verify=False)
    samples = splits.test or splits.val
    if limit is not None and len(samples) > limit:
        step = len(samples) / limit
        samples = [samples[int(i * step)] for i in range(limit)]
    return [(Path(path), task, splits.class_names[label]) for path, label in samples]


def _unknown_items(folders: Sequence[str], limit: int | None) -> list[Path]:
    items: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if (root / "test").is_dir() or (root / "train").is_dir():
            items += [path for path, _, _ in _test_items(folder, "unknown", limit)]
        else:  # a plain folder of images
            files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
            items += files[:limit] if limit is not None else files
    return items


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _forward_costs(predictor: Predictor, tasks: Sequence[str], batch: int, repeats: int) -> tuple[float, float]:
    """Seconds of one batch of ``batch`` decoded images through the task forward alone, and through routing plus
    the task forward, on the predictor's own model and input stage."""
    state = predictor._state
    assert state.router is not None
    key, router = state.router
    group = state.groups[key]
    images = torch.randint(0, 256, (batch, *group.input_hw, 3), dtype=torch.uint8)
    rows = [state.rows[tasks[i % len(tasks)]] for i in range(batch)]
    compiled = bool(predictor.compile)

    def known() -> None:
        predictor._logits(group, images, rows, batch, compiled=compiled)

    def routed() -> None:
        predictor._route(group, router, images)
        predictor._logits(group, images, rows, batch, compiled=compiled)

    return _timed(known, predictor.device, repeats), _timed(routed, predictor.device, repeats)


def bench_routing(
    datasets: Sequence[str],
    unknown: Sequence[str],
    backbone: BackboneRecord,
    config: TrainConfig,
    *,
    methods: Sequence[str] = get_args(RoutingMethod),
    test_limit: int | None = None,
    batch: int = 64,
    precision: str = "fp32",
    repeats: int = 3,
    workdir: str | Path | None = None,
    log: Log | None = None,
) -> list[Row]:
    """Register every dataset as a task, then score and time each routing method (see the module docstring).

    Returns:
        One row per method: selection accuracy (all and per task), top-1 with ``auto`` and with the task given,
        false rejection, open-set rejection, and the cost ratios.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    names = [task_name(d) for d in datasets]
    if len(set(names)) != len(names):
        raise ValueError(f"two datasets would get the same task name: {names}")
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        engine = open_registry(f"sqlite:///{root / 'registry.db'}")
        try:
            with registry.transaction(engine, "registering the backbone") as s:
                if backbone.name not in {b.name for b in registry.list_backbones(s)}:
                    registry.add_backbone(s, backbone)
            train_seconds: dict[str, float] = {}
            with Session(engine) as s:
                stored = {r.name for r in registry.list_tasks(s)}
            for name, folder in zip(names, datasets, strict=True):
                if name in stored:
                    continue
                started = time.perf_counter()
                _, result = train_and_store(engine, name, backbone.name, folder, config)
                train_seconds[name] = time.perf_counter() - started
                log(f"{name}: registered in {train_seconds[name]:.0f} s, test top-1 {result.test_top1}")
            items = [
                item
                for name, folder in zip(names, datasets, strict=True)
                for item in _test_items(folder, name, test_limit)
            ]
            strangers = _unknown_items(unknown, test_limit)
            return [
                _bench_method(engine, method, names, items, strangers, config, batch, precision, repeats, log)
                | {"train_seconds": train_seconds}
                for method in methods
            ]
        finally:
            engine.dispose()


def _bench_method(engine, method, names, items, strangers, config, batch, precision, repeats, log) -> Row:
    predictor = Predictor(engine, names, device=config.device, precision=precision, routing=method)
    try:
        known_items = [(path, task) for path, task, _ in items]
        auto_items = [(path, AUTO_TASK) for path, _, _ in items]
        known = predictor.predict(known_items, batch_size=batch)
        auto = predictor.predict(auto_items, batch_size=batch)
        foreign = predictor.predict([(p, AUTO_TASK) for p in strangers], batch_size=batch) if strangers else []
        known_s = _timed(lambda: predictor.predict(known_items, batch_size=batch), predictor.device, repeats)
        auto_s = _timed(lambda: predictor.predict(auto_items, batch_size=batch), predictor.device, repeats)
        forward_known, forward_routed = _forward_costs(predictor, names, batch, repeats)
    finally:
        predictor.close()
    per_task: dict[str, dict[str, float]] = {}
    for name in names:
        mine = [j for j, (_, task, _) in enumerate(items) if task == name]
        per_task[name] = {
            "images": len(mine),
            "selection": sum(auto[j].task == name for j in mine) / len(mine),
            "top1_known": sum(known[j].labels[0] == items[j][2] for j in mine) / len(mine),
            "top1_auto": sum(auto[j].task == name and auto[j].labels[0] == items[j][2] for j in mine) / len(mine),
            "rejected": sum(auto[j].task == NO_TASK for j in mine) / len(mine),
        }
    mean = {k: statistics.fmean(t[k] for t in per_task.values()) for k in ("selection", "top1_known", "top1_auto")}
    row: Row = {
        "method": method,
        "tasks": len(names),
        "test_images": len(items),
        "selection": mean["selection"],
        "top1_known": mean["top1_known"],
        "top1_auto": mean["top1_auto"],
        "auto_vs_known": mean["top1_auto"] / mean["top1_known"] if mean["top1_known"] else None,
        "false_rejection": sum(p.task == NO_TASK for p in auto) / len(auto),
        "unknown_images": len(foreign),
        "unknown_rejected": sum(p.task == NO_TASK for p in foreign) / len(foreign) if foreign else None,
        "predict_known_s": known_s,
        "predict_auto_s": auto_s,
        "predict_cost_ratio": auto_s / known_s,
        "forward_known_ms": 1e3 * forward_known,
        "forward_routed_ms": 1e3 * forward_routed,
        "forward_cost_ratio": forward_routed / forward_known,
        "batch": batch,
        "precision": precision,
        "device": str(predictor.device),
        "per_task": per_task,
    }
    log(
        f"{method}: selection {100 * row['selection']:.1f}%, top-1 auto {100 * row['top1_auto']:.1f}% vs known "
        f"{100 * row['top1_known']:.1f}%, unknown rejected {row['unknown_rejected']}, "
        f"forward cost x{row['forward_cost_ratio']:.2f}"
    )
    return row


def markdown_table(rows: Sequence[Row]) -> str:
    """The methods side by side, in percent; cost as multiples of a known-task forward / predict."""
    lines = [
        "| method | task selection | top-1 auto | top-1 task given | auto / given | false rejection | unknown rejected "
        "| forward cost | predict cost |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        unknown = "" if r["unknown_rejected"] is None else f"{100 * r['unknown_rejected']:.1f}"
        ratio = "" if r["auto_vs_known"] is None else f"{r['auto_vs_known']:.3f}"
        lines.append(
            f"| {r['method']} | {100 * r['selection']:.1f} | {100 * r['top1_auto']:.1f} | {100 * r['top1_known']:.1f} "
            f"| {ratio} | {100 * r['false_rejection']:.1f} | {unknown} "
            f"| {r['forward_cost_ratio']:.2f}x | {r['predict_cost_ratio']:.2f}x |"
        )
    return "\n".join(lines)
