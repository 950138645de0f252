"""A picture of one stored task: its γ/β per site, the backbone's weights before and after folding, its metrics.

In the spirit of the SSF paper's Figure 4: how far a task's scale and shift moved from the identity (γ = 1, β = 0)
at each site, in the order the model lists its sites (timm's module order, which follows the forward pass), and
what folding them does to the frozen weights. The numbers are computed by a pure function,
:func:`task_plot_data`, so they can be checked without reading pixels; :func:`draw_task_plot` only draws them.

The training panel shows the version's per-epoch curves (stored with every version trained by this ssf-tasks), or,
for a version stored without them, the val/test top-1 of every version of the task.

matplotlib is imported inside :func:`draw_task_plot`, with no pyplot and no global backend switch (a bare
``Figure`` renders with Agg), so importing this module stays cheap and other users of matplotlib are unaffected.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from . import registry
from .atomic_files import atomic_path
from .config import TaskRecord, validate_name
from .engine import load_tasks
from .errors import SSFTasksError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from torch import nn

    from .model import MultiTaskSSF

__all__ = [
    "HISTOGRAM_SITES",
    "SiteStats",
    "Summary",
    "TaskPlotData",
    "WeightHistogram",
    "check_plot_path",
    "draw_task_plot",
    "plot_task",
    "task_plot_data",
]

HISTOGRAM_SITES = 3
"""How many sites get a before/after weight histogram: the first, a middle and the last site whose op has a
weight matrix (Linear, Conv). Norm weights are per-channel vectors; their change is γ itself, shown above them."""


@dataclass(frozen=True)
class Summary:
    """Mean, standard deviation (population: divided by the count, so one value has std 0), min and max."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: torch.Tensor) -> Summary:
        """The summary of every element of ``values``, computed in float64 so large weights sum exactly enough."""
        flat = values.detach().double().flatten()
        std, mean = torch.std_mean(flat, correction=0)
        return cls(float(mean), float(std), float(flat.min()), float(flat.max()))


@dataclass(frozen=True)
class SiteStats:
    """One SSF site of one task: its γ and β, and its op's weight in the backbone and in the folded model.

    Attributes:
        name: The site's module name (timm's, e.g. ``blocks.0.attn.qkv``).
        op: The class name of the frozen op (``Linear``, ``Conv2d``, ``LayerNorm``, ...).
        channels: Channels the site scales.
        scale: γ over the site's channels.
        shift: β over the channels; ``None`` at a site whose op has no bias (it has a scale only).
        weight_before: The op's weight in the shared backbone.
        weight_after: The same weight in the folded model (``γ ⊙ W``, row by output channel).
    """

    name: str
    op: str
    channels: int
    scale: Summary
    shift: Summary | None
    weight_before: Summary
    weight_after: Summary


@dataclass(frozen=True)
class WeightHistogram:
    """Counts of one site's weights before and after folding, on shared bin edges spanning both."""

    site: str
    edges: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor


@dataclass(frozen=True)
class TaskPlotData:
    """Everything the task plot shows, as numbers.

    Attributes:
        task: The task's name.
        sites: One entry per SSF site, in the model's site order.
        histograms: Before/after weight histograms of up to :data:`HISTOGRAM_SITES` representative sites.
        record: The plotted version's record, when it came from the registry.
        versions: Every stored version of the task, oldest first (empty when not from the registry).
    """

    task: str
    sites: list[SiteStats]
    histograms: list[WeightHistogram]
    record: TaskRecord | None = None
    versions: list[TaskRecord] = field(default_factory=list)


def _representative(names: Sequence[str], count: int) -> list[str]:
    """``count`` names spread evenly from the first to the last (all of them when there are fewer)."""
    if len(names) <= count:
        return list(names)
    if count == 1:
        return [names[0]]
    return [names[round(i * (len(names) - 1) / (count - 1))] for i in range(count)]


def _histogram(site: str, before: torch.Tensor, after: torch.Tensor, bins: int) -> WeightHistogram:
    b, a = before.detach().double().cpu().flatten(), after.detach().double().cpu().flatten()
    low, high = float(torch.minimum(b.min(), a.min())), float(torch.maximum(b.max(), a.max()))
    if high <= low:  # a constant weight: widen the range so the bins have a width
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    return WeightHistogram(site, edges, torch.histogram(b, edges).hist, torch.histogram(a, edges).hist)


@torch.no_grad()
def task_plot_data(
    model: MultiTaskSSF,
    name: str,
    *,
    folded: nn.Module | None = None,
    record: TaskRecord | None = None,
    versions: Sequence[TaskRecord] = (),
    bins: int = 60,
) -> TaskPlotData:
    """The numbers behind the task plot: γ/β per site and the op weights before and after folding.

    Args:
        model: A model holding task ``name``; its backbone is only read.
        name: The task.
        folded: The task already folded (``model.fold(name)``); folded here when not given.
        record: The plotted version's record, for the title and to mark it among ``versions``.
        versions: Every stored version of the task, for the metrics panel.
        bins: Bins of each weight histogram.

    Raises:
        TaskNotFoundError: ``model`` holds no task ``name``.
        FoldError: The task's γ/β are not finite.
    """
    t = model.task_index(name)
    folded = folded if folded is not None else model.fold(name)
    sites: list[SiteStats] = []
    matrices: list[str] = []
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for site_name, site in model.named_sites():
        before = site.base_layer.weight
        after = folded.get_submodule(site_name).weight
        weights[site_name] = before, after
        if before.ndim >= 2:
            matrices.append(site_name)
        sites.append(
            SiteStats(
                name=site_name,
                op=type(site.base_layer).__name__,
                channels=site.channels,
                scale=Summary.of(site.ssf_scale[t]),
                shift=Summary.of(site.ssf_shift[t]) if site.ssf_shift is not None else None,
                weight_before=Summary.of(before),
                weight_after=Summary.of(after),
            )
        )
    chosen = _representative(matrices or [s.name for s in sites], HISTOGRAM_SITES)
    histograms = [_histogram(n, *weights[n], bins) for n in chosen]
    return TaskPlotData(name, sites, histograms, record, list(versions))


# ------------------------------------------------------------------------------------------------ drawing
def _short(site: str) -> str:
    """A tick label: ``blocks.3.attn.qkv`` stays, long paths keep their last three parts."""
    parts = site.split(".")
    return site if len(parts) <= 4 else "…" + ".".join(parts[-3:])


def _site_axis(ax: Axes, names: Sequence[str], positions: Sequence[int]) -> None:
    """Site names under the x axis, thinned to about 30 so they stay legible on deep models."""
    step = max(1, math.ceil(len(positions) / 30))
    ax.set_xticks(list(positions[::step]), [_short(names[i]) for i in positions[::step]], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(names) - 0.5)
    ax.grid(axis="y", alpha=0.3)


def _draw_band(ax: Axes, names: Sequence[str], stats: Sequence[Summary | None], identity: float, what: str) -> None:
    """Per-site mean with a ±std band and a min-max band, against the identity value (γ = 1, β = 0)."""
    positions = [i for i, s in enumerate(stats) if s is not None]
    present = [s for s in stats if s is not None]
    if not present:
        ax.text(0.5, 0.5, f"no site has a {what}", ha="center", va="center", transform=ax.transAxes)
        return
    mean = [s.mean for s in present]
    ax.fill_between(positions, [s.min for s in present], [s.max for s in present], alpha=0.15, label="min–max")
    ax.fill_between(
        positions, [s.mean - s.std for s in present], [s.mean + s.std for s in present], alpha=0.35, label="mean ± std"
    )
    ax.plot(positions, mean, marker=".", markersize=3, linewidth=1, label="mean")
    ax.axhline(identity, color="gray", linestyle="--", linewidth=0.8, label=f"identity ({identity:g})")
    ax.legend(fontsize=7, loc="best")
    _site_axis(ax, names, positions)


def _draw_histogram(ax: Axes, histogram: WeightHistogram, op: str) -> None:
    edges = histogram.edges.numpy()
    ax.stairs(histogram.before.numpy(), edges, label="backbone", linewidth=1.2)
    ax.stairs(histogram.after.numpy(), edges, label="folded", linewidth=1.2, linestyle="--")
    ax.set_yscale("log")
    ax.set_title(f"{histogram.site} ({op}) weights", fontsize=9)
    ax.set_xlabel("value", fontsize=8)
    ax.legend(fontsize=7)


def _draw_weight_std(ax: Axes, data: TaskPlotData) -> None:
    """Weight std of every site on a log axis, as points: a constant weight (a norm's initial ones) has std 0 and
    no point before folding, while after folding its std is γ's."""
    names = [s.name for s in data.sites]
    positions = list(range(len(names)))
    for label, marker, values in (
        ("backbone", "o", [s.weight_before.std for s in data.sites]),
        ("folded", "x", [s.weight_after.std for s in data.sites]),
    ):
        shown = [v if v > 0 else math.nan for v in values]
        ax.plot(positions, shown, marker=marker, linestyle="none", markersize=5, fillstyle="none", label=label)
    ax.set_yscale("log")
    ax.set_title("weight std per site, before and after folding", fontsize=10)
    ax.legend(fontsize=7)
    _site_axis(ax, names, positions)


def _draw_versions(ax: Axes, data: TaskPlotData) -> None:
    """Val and test top-1 of every stored version (the registry keeps these, not per-epoch curves)."""
    ax.set_title("stored metrics per version (per-epoch curves are not stored)", fontsize=10)
    if not data.versions:
        ax.text(0.5, 0.5, "no stored versions", ha="center", va="center", transform=ax.transAxes)
        return
    numbers = [r.version for r in data.versions]
    for label, marker, size, values in (
        ("val top-1", "o", 9, [r.metrics.val_top1 for r in data.versions]),
        ("test top-1", "s", 5, [r.metrics.test_top1 for r in data.versions]),
    ):  # val drawn larger and hollow, so equal values stay visible
        shown = [math.nan if v is None else 100 * v for v in values]
        ax.plot(numbers, shown, marker=marker, markersize=size, fillstyle="none" if size > 5 else "full", label=label)
    for r in data.versions:
        best = "-" if r.metrics.best_epoch is None else str(r.metrics.best_epoch)
        top = max((v for v in (r.metrics.val_top1, r.metrics.test_top1) if v is not None), default=0.0)
        ax.annotate(
            f"epochs run {r.metrics.epochs_run}, best {best}\n{r.metrics.train_seconds:.1f} s",
            (r.version, 100 * top),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=7,
        )
    if data.record is not None:
        ax.axvline(data.record.version, color="gray", linestyle=":", linewidth=1, label="plotted version")
    ax.set_xticks(numbers)
    ax.set_xlim(min(numbers) - 0.5, max(numbers) + 0.5)
    ax.set_ylim(0, 115)
    ax.set_xlabel("version", fontsize=8)
    ax.set_ylabel("top-1 (%)", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _draw_curves(ax: Axes, record: TaskRecord) -> None:
    """The plotted version's training curves: train loss (right axis), train and val top-1 per epoch (epoch 0 is
    the probe head's val top-1), the kept epoch marked."""
    history = record.metrics.history
    ax.set_title(f"training curves of version {record.version} (epoch 0: the probe head)", fontsize=10)
    for key, label, marker in (("train_top1", "train top-1", "."), ("val_top1", "val top-1", "o")):
        points = [(h["epoch"], 100 * h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    if record.metrics.best_epoch is not None:
        ax.axvline(record.metrics.best_epoch, color="gray", linestyle=":", linewidth=1, label="kept epoch")
    losses = [(h["epoch"], h["loss"]) for h in history if "loss" in h]
    if losses:
        loss_ax = ax.twinx()
        loss_ax.plot(*zip(*losses, strict=True), color="tab:red", linestyle="--", label="train loss")
        loss_ax.set_ylabel("train loss", fontsize=8)
        loss_ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("top-1 (%)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def draw_task_plot(data: TaskPlotData, out: str | os.PathLike[str]) -> Path:
    """Draw ``data`` into a PNG at ``out`` (written under a temporary name, then renamed into place).

    Raises:
        SSFTasksError: matplotlib is not installed, or the file cannot be written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise SSFTasksError("plotting needs matplotlib: pip install matplotlib") from e

    names = [s.name for s in data.sites]
    columns = max(1, len(data.histograms))
    mosaic = [
        ["scale"] * columns + ["shift"] * columns,
        [f"hist{i}" for i in range(columns) for _ in (0, 1)],
        ["std"] * columns + ["train"] * columns,
    ]
    figure = Figure(figsize=(16, 13), layout="constrained")
    axes = figure.subplot_mosaic(mosaic)
    title = f"task '{data.task}'"
    if data.record is not None:
        title += f" version {data.record.version} on backbone '{data.record.backbone}'"
    figure.suptitle(f"{title}: {len(data.sites)} SSF sites in forward order")

    _draw_band(axes["scale"], names, [s.scale for s in data.sites], 1.0, "scale")
    axes["scale"].set_title("γ (scale) per site", fontsize=10)
    _draw_band(axes["shift"], names, [s.shift for s in data.sites], 0.0, "shift")
    axes["shift"].set_title("β (shift) per site; sites after a bias-free op have none", fontsize=10)
    ops = {s.name: s.op for s in data.sites}
    for i in range(columns):
        if i < len(data.histograms):
            _draw_histogram(axes[f"hist{i}"], data.histograms[i], ops[data.histograms[i].site])
    _draw_weight_std(axes["std"], data)
    if data.record is not None and data.record.metrics.history:
        _draw_curves(axes["train"], data.record)
    else:
        _draw_versions(axes["train"], data)

    path = Path(out)
    with atomic_path(path) as temp:
        figure.savefig(temp, format="png", dpi=100)
    return path


# -------------------------------------------------------------------------------------- from the registry
def check_plot_path(out: str | os.PathLike[str]) -> Path:
    """Refuse an output path that cannot take the plot, before any model is loaded.

    Raises:
        SSFTasksError: ``out`` does not end in ``.png``, is a folder, or its folder is missing or not writable.
    """
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise SSFTasksError(f"the plot is a PNG file: its name must end in .png, not {path.name!r}", field="out")
    if path.is_dir():
        raise SSFTasksError(f"cannot write the plot to {path}: it is a folder", field="out")
    folder = path.parent
    if not folder.is_dir():
        raise SSFTasksError(f"cannot write the plot to {path}: folder {folder} does not exist", field="out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SSFTasksError(f"cannot write the plot to {path}: folder {folder} is not writable", field="out")
    return path


def plot_task(engine: Engine, name: str, out: str | os.PathLike[str], *, version: int | None = None) -> Path:
    """Plot one stored task version (the latest by default) into a PNG; see :func:`task_plot_data`.

    Returns:
        The file written.

    Raises:
        SSFTasksError: A bad output path (checked first, before anything is loaded).
        TaskNotFoundError: An unknown task or version.
        BackboneMismatchError, WeightsNotFoundError: The task's backbone cannot be loaded as it was trained.
    """
    path = check_plot_path(out)
    validate_name("task", name)
    loaded = load_tasks(engine, [name], versions={name: version} if version is not None else None)
    with Session(engine) as s:
        versions = registry.list_task_versions(s, name)
    data = task_plot_data(loaded.model_of(name), name, record=loaded.tasks[name], versions=versions)
    return draw_task_plot(data, path)
