"""MultiTaskSSF: one frozen timm backbone, many tasks, each a row in every SSF table plus a head.

Everything a task owns lives in tables indexed by task: ``ssf_scale`` / ``ssf_shift`` at every site
(``[T, C]``) and the heads (``head_weight [T, K_max, D]``, ``head_bias [T, K_max]``). A mixed batch gathers
each sample's rows; a batch of one task broadcasts one row. The backbone is frozen and always runs in eval
mode: its weights and BatchNorm statistics are shared by every task and never change.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import adopt_all, set_mixed_kernel
from .errors import (
    BackboneError,
    BatchMismatchError,
    DuplicateTaskError,
    PatternMatchError,
    StateDictMismatchError,
    TaskNotFoundError,
)
from .fold import fold_task
from .sites import find_sites
from .ssf import SSFLayer, TaskRouting

__all__ = ["MultiTaskSSF", "Tasks"]

Tasks = str | Sequence[str] | torch.Tensor
_SSF_KEYS = ("ssf_scale", "ssf_shift")


class MultiTaskSSF(nn.Module):
    """A frozen timm backbone with SSF sites and per-task heads.

    The backbone is adapted in place (its sites are replaced by ``SSFLayer`` wrappers, as PEFT does) and
    frozen; its original weights stay reachable through :meth:`backbone_state_dict`.

    Args:
        backbone: a timm model created with ``num_classes=0``.
        include: optional name patterns restricting the sites (see :func:`ssf_tasks.sites.find_sites`).
        exclude: optional name patterns removing sites.
        sigma: standard deviation of the initial γ ~ N(1, σ) and β ~ N(0, σ) of a new task.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        sigma: float = 0.02,
    ) -> None:
        super().__init__()
        for method in ("forward_features", "forward_head", "get_classifier", "reset_classifier"):
            if not hasattr(backbone, method):
                raise BackboneError(f"{type(backbone).__name__} is not a timm model (it has no {method}())")
        if not isinstance(backbone.get_classifier(), nn.Identity):
            raise BackboneError("the backbone must be created with num_classes=0 (its classifier is not empty)")
        backbone.requires_grad_(False)
        backbone.eval()
        self.backbone = backbone
        self.sigma = sigma
        self.routing = TaskRouting()
        self.site_names: list[str] = []
        for spec in find_sites(backbone, include, exclude):
            backbone.set_submodule(spec.name, SSFLayer(spec.module, spec.rule, self.routing))
            self.site_names.append(spec.name)
        self.adapted = adopt_all(backbone)
        weight = next(iter(backbone.parameters()))
        self.num_features = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)
        factory = {"dtype": torch.float32, "device": weight.device}
        self.head_weight = nn.Parameter(torch.zeros(0, 0, self.num_features, **factory))
        self.head_bias = nn.Parameter(torch.zeros(0, 0, **factory))
        self.register_buffer("class_counts", torch.zeros(0, dtype=torch.long, device=weight.device), persistent=False)
        self.task_names: list[str] = []
        self._index: dict[str, int] = {}
        self._counts: list[int] = []  # class_counts on the host: no device sync to read one

    # ----------------------------------------------------------------------------------------- introspection
    @property
    def sites(self) -> list[SSFLayer]:
        """The SSF layers, in the order of ``site_names``."""
        return [site for _, site in self.named_sites()]

    def named_sites(self) -> list[tuple[str, SSFLayer]]:
        """``(name, layer)`` for every SSF site."""
        return [(name, self.backbone.get_submodule(name)) for name in self.site_names]

    @property
    def ssf_parameters_per_task(self) -> int:
        """How many γ/β numbers one task owns (0.206M for ViT-B/16 with the paper's placement)."""
        return sum(s.channels * (2 if s.ssf_shift is not None else 1) for s in self.sites)

    @property
    def max_classes(self) -> int:
        return int(self.head_weight.shape[1])

    def num_classes(self, name: str) -> int:
        return self._counts[self.task_index(name)]

    def task_index(self, name: str) -> int:
        """The row of task ``name`` in every table."""
        try:
            return self._index[name]
        except KeyError:
            known = ", ".join(self.task_names) if self.task_names else "none"
            raise TaskNotFoundError(f"unknown task {name!r}; known tasks: {known}") from None

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The frozen backbone's weights under timm's own keys (SSF tables left out)."""
        out = {}
        for key, value in self.backbone.state_dict().items():
            if key.rsplit(".", 1)[-1] not in _SSF_KEYS:
                out[key.replace(".base_layer.", ".")] = value
        return out

    def set_fast_path(self, enabled: bool | None) -> None:
        """Fused single-task SSF (``SSFLayer._fast_forward``): None = on CUDA only (default); True/False force it."""
        for site in self.sites:
            site.fast_path = enabled

    def set_mixed_kernel(self, name: str, enabled: bool) -> None:
        """An adapter's mixed-batch kernel on or off (on by default): ``"attention"``
        (``ssf_tasks.kernels.mixed_attention``) or ``"gelu"`` (``ssf_tasks.kernels.mixed_gelu``)."""
        set_mixed_kernel(self.backbone, name, enabled)

    def set_mixed_attention(self, enabled: bool) -> None:
        """``set_mixed_kernel("attention", enabled)``."""
        self.set_mixed_kernel("attention", enabled)

    def set_mixed_gelu(self, enabled: bool) -> None:
        """``set_mixed_kernel("gelu", enabled)``."""
        self.set_mixed_kernel("gelu", enabled)

    def train(self, mode: bool = True) -> MultiTaskSSF:
        """Switch heads/SSF to training; the frozen backbone stays in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ----------------------------------------------------------------------------------------- tasks
    def _tables(self) -> Iterator[tuple[nn.Module, str]]:
        for site in self.sites:
            yield site, "ssf_scale"
            if site.ssf_shift is not None:
                yield site, "ssf_shift"
        yield self, "head_weight"
        yield self, "head_bias"

    def _set_tasks(self, names: list[str], counts: list[int]) -> None:
        self.task_names = names
        self._index = {n: i for i, n in enumerate(names)}
        self._counts = counts
        self.class_counts = torch.tensor(counts, dtype=torch.long, device=self.class_counts.device)

    def add_task(self, name: str, num_classes: int, *, generator: torch.Generator | None = None) -> None:
        """Add a task: γ ~ N(1, σ), β ~ N(0, σ) at every site and a fresh head of ``num_classes`` outputs.

        Earlier tasks' rows are copied unchanged, so their outputs stay bit-identical.
        """
        self.add_tasks({name: num_classes}, generator=generator)

    def add_tasks(self, tasks: Mapping[str, int], *, generator: torch.Generator | None = None) -> None:
        """Add several tasks ``{name: num_classes}`` with one copy of every table (not one per task)."""
        for name, num_classes in tasks.items():
            if not isinstance(name, str) or not name:
                raise DuplicateTaskError(f"a task name must be a non-empty string, got {name!r}")
            if name in self._index:
                raise DuplicateTaskError(f"task {name!r} already exists")
            if not isinstance(num_classes, int) or num_classes < 1:
                raise StateDictMismatchError(f"num_classes must be a positive integer, got {num_classes!r}")
        count, counts = len(tasks), list(tasks.values())
        with torch.no_grad():
            for site in self.sites:
                noise = torch.randn(count, 2, site.channels, generator=generator) * self.sigma
                _append_rows(site, "ssf_scale", 1.0 + noise[:, 0])
                if site.ssf_shift is not None:
                    _append_rows(site, "ssf_shift", noise[:, 1])
            self.widen_heads(max(counts))
            width = self.max_classes
            heads = torch.zeros(count, width, self.num_features)
            bound = 1.0 / math.sqrt(self.num_features)  # nn.Linear's default range
            for row, k in enumerate(counts):
                heads[row, :k].uniform_(-bound, bound, generator=generator)
            _append_rows(self, "head_weight", heads)
            _append_rows(self, "head_bias", torch.zeros(count, width))
        self._set_tasks([*self.task_names, *tasks], [*self._counts, *counts])

    def widen_heads(self, width: int) -> None:
        """Give every head at least ``width`` columns: zero columns, masked to ``-inf`` like any column past a
        task's class count, so no task's logits change."""
        if width > self.max_classes:
            pad = (0, 0, 0, width - self.max_classes)
            with torch.no_grad():
                self.head_weight = _like(self.head_weight, nn.functional.pad(self.head_weight.detach(), pad))
                self.head_bias = _like(self.head_bias, nn.functional.pad(self.head_bias.detach(), pad[2:]))

    def remove_task(self, name: str) -> None:
        """Drop a task's rows from every table; other tasks are unaffected."""
        keep = [i for i in range(len(self.task_names)) if i != self.task_index(name)]
        with torch.no_grad():
            for module, attr in self._tables():
                table = getattr(module, attr)
                setattr(module, attr, _like(table, table.detach()[keep].clone()))
        self._set_tasks([self.task_names[i] for i in keep], [self._counts[i] for i in keep])

    def table_keys(self) -> list[str]:
        """The state-dict key of each table, in the order :meth:`isolate_tasks` yields the tables."""
        keys = []
        for site_name, site in self.named_sites():
            keys.append(f"{site_name}.ssf_scale")
            if site.ssf_shift is not None:
                keys.append(f"{site_name}.ssf_shift")
        return [*keys, "head.weight", "head.bias"]

    def pin_to_identity(
        self, name: str, *, adapt: str = "scale_shift", train_sites: Sequence[str] | None = None
    ) -> set[str]:
        """Set the γ (to 1) and β (to 0) of task ``name`` that are not to train; returns their state-dict keys.

        ``adapt`` is ``"scale_shift"``, ``"scale"`` or ``"shift"``; ``train_sites`` are fnmatch patterns of the
        site names that train (None: every site). What is pinned folds to the backbone's own weights.
        """
        if adapt not in ("scale_shift", "scale", "shift"):
            raise ValueError(f"adapt must be 'scale_shift', 'scale' or 'shift', got {adapt!r}")
        names = [site_name for site_name, _ in self.named_sites()]
        training = set(names)
        if train_sites is not None:
            training = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in train_sites)}
            if not training:
                raise PatternMatchError(f"no SSF site matches {list(train_sites)} (sites look like {names[0]!r})")
        state = self.task_state_dict(name)
        pinned = set()
        for key in state:
            site_name, _, attr = key.rpartition(".")
            if site_name == "head":
                continue
            trains = site_name in training and (adapt == "scale_shift" or attr == f"ssf_{adapt}")
            if not trains:
                state[key] = torch.ones_like(state[key]) if attr == "ssf_scale" else torch.zeros_like(state[key])
                pinned.add(key)
        if pinned:
            self.update_task(name, state)
        return pinned

    def task_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """One task's γ/β (``<site>.ssf_scale``, ``<site>.ssf_shift``) and head (``head.weight``, ``head.bias``)."""
        t, k = self.task_index(name), self.num_classes(name)
        state = {}
        for site_name, site in self.named_sites():
            state[f"{site_name}.ssf_scale"] = site.ssf_scale[t].detach().clone()
            if site.ssf_shift is not None:
                state[f"{site_name}.ssf_shift"] = site.ssf_shift[t].detach().clone()
        state["head.weight"] = self.head_weight[t, :k].detach().clone()
        state["head.bias"] = self.head_bias[t, :k].detach().clone()
        return state

    def load_task(self, name: str, state: dict[str, torch.Tensor], *, replace: bool = False) -> None:
        """Add task ``name`` from a :meth:`task_state_dict` (checked key by key before anything changes)."""
        num_classes = self._check_task_state(name, state)
        if name in self._index:
            if not replace:
                raise DuplicateTaskError(f"task {name!r} already exists")
            self.remove_task(name)
        self.add_task(name, num_classes)
        self._write_task_rows(self.task_index(name), state)

    def load_tasks(self, states: Mapping[str, dict[str, torch.Tensor]]) -> None:
        """Add several new tasks from their :meth:`task_state_dict`, all checked first, with one copy of every table."""
        counts = {name: self._check_task_state(name, state) for name, state in states.items()}
        self.add_tasks(counts)
        for name, state in states.items():
            self._write_task_rows(self.task_index(name), state)

    def write_task(self, row_of: str, name: str, state: dict[str, torch.Tensor]) -> None:
        """Put task ``name`` into the row that ``row_of`` holds now, in place.

        No table is reallocated, so a compiled forward keeps reading the same tensors and needs no new graph;
        batches that index other rows are not affected. The task's classes must fit :attr:`max_classes`.
        """
        num_classes = self._check_task_state(name, state)
        t = self.task_index(row_of)
        if name != row_of and name in self._index:
            raise DuplicateTaskError(f"task {name!r} already exists")
        if num_classes > self.max_classes:
            raise StateDictMismatchError(
                f"task {name!r} has {num_classes} classes, more than the {self.max_classes} columns of the heads"
            )
        self._write_task_rows(t, state)
        with torch.no_grad():
            self.class_counts[t] = num_classes
        names, counts = list(self.task_names), list(self._counts)
        names[t], counts[t] = name, num_classes
        self.task_names, self._counts = names, counts
        self._index = {n: i for i, n in enumerate(names)}

    def rename_task(self, old: str, new: str) -> None:
        """Give task ``old``'s row the name ``new``; no tensor changes."""
        t = self.task_index(old)
        if new in self._index:
            raise DuplicateTaskError(f"task {new!r} already exists")
        names = list(self.task_names)
        names[t] = new
        self.task_names = names
        self._index = {n: i for i, n in enumerate(names)}

    def update_task(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Overwrite an existing task's rows in place (same class count), keeping its position."""
        num_classes = self._check_task_state(name, state)
        if num_classes != self.num_classes(name):
            raise StateDictMismatchError(
                f"task {name!r} has {self.num_classes(name)} classes, the new state has {num_classes}"
            )
        self._write_task_rows(self.task_index(name), state)

    def _check_task_state(self, name: str, state: dict[str, torch.Tensor]) -> int:
        """Validate a one-task state dict against this backbone; returns its class count."""
        expected: dict[str, tuple[int, ...]] = {}
        for site_name, site in self.named_sites():
            expected[f"{site_name}.ssf_scale"] = (site.channels,)
            if site.ssf_shift is not None:
                expected[f"{site_name}.ssf_shift"] = (site.channels,)
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected and k not in ("head.weight", "head.bias")]
        if missing or unexpected:
            which = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
            raise StateDictMismatchError(
                f"task state for {name!r} does not fit this backbone: {which} "
                f"({len(missing)} missing, {len(unexpected)} unexpected)"
            )
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise StateDictMismatchError(
                    f"task state for {name!r}: {key!r} has shape {tuple(state[key].shape)}, this backbone needs {shape}"
                )
        weight, bias = state.get("head.weight"), state.get("head.bias")
        if weight is None or bias is None:
            raise StateDictMismatchError(f"task state for {name!r}: missing key 'head.weight' or 'head.bias'")
        if weight.ndim != 2 or weight.shape[1] != self.num_features or tuple(bias.shape) != (weight.shape[0],):
            raise StateDictMismatchError(
                f"task state for {name!r}: 'head.weight' {tuple(weight.shape)} / 'head.bias' {tuple(bias.shape)} "
                f"do not fit features of size {self.num_features}"
            )
        return int(weight.shape[0])

    def _write_task_rows(self, t: int, state: dict[str, torch.Tensor]) -> None:
        weight, bias = state["head.weight"], state["head.bias"]
        with torch.no_grad():
            for site_name, site in self.named_sites():
                site.ssf_scale[t] = state[f"{site_name}.ssf_scale"].to(site.ssf_scale)
                if site.ssf_shift is not None:
                    site.ssf_shift[t] = state[f"{site_name}.ssf_shift"].to(site.ssf_shift)
            self.head_weight[t] = 0.0
            self.head_bias[t] = 0.0
            self.head_weight[t, : weight.shape[0]] = weight.to(self.head_weight)
            self.head_bias[t, : bias.shape[0]] = bias.to(self.head_bias)

    @contextmanager
    def isolate_tasks(self, names: Sequence[str]) -> Iterator[list[nn.Parameter]]:
        """Train only ``names``: every table is swapped for a small one holding just their rows.

        The optimizer gets these small tables, so the other tasks' rows are not even in the graph and cannot
        change (not through weight decay either). On a clean exit the trained rows are written back; on an
        exception the model is restored untouched.

        Yields:
            The parameters to optimise (small γ/β tables and heads).
        """
        rows = [self.task_index(n) for n in names]
        if len(set(rows)) != len(rows):
            raise DuplicateTaskError(f"a task is named twice in {list(names)}")
        full = {key: getattr(*key) for key in self._tables()}
        saved_names, saved_counts = self.task_names, self._counts
        for (module, attr), table in full.items():
            setattr(module, attr, nn.Parameter(table.detach()[rows].clone()))
        self._set_tasks(list(names), [saved_counts[r] for r in rows])
        trained = [getattr(*key) for key in full]
        finished = False
        try:
            yield trained
            finished = True
        finally:
            for (module, attr), table in full.items():
                setattr(module, attr, table)
            self._set_tasks(saved_names, saved_counts)
            if finished:
                with torch.no_grad():
                    for table, small in zip(full.values(), trained, strict=True):
                        table[rows] = small.detach().to(table.dtype)

    # ----------------------------------------------------------------------------------------- forward
    def resolve_tasks(self, tasks: Tasks, batch: int) -> int | torch.Tensor:
        """Per-sample task rows: an ``int`` when one task serves the whole batch, else a LongTensor ``[B]``."""
        if isinstance(tasks, str):
            return self.task_index(tasks)
        if isinstance(tasks, torch.Tensor):
            if tasks.ndim != 1 or tasks.shape[0] != batch:
                raise BatchMismatchError(f"got {tuple(tasks.shape)} task indices for a batch of {batch}")
            if tasks.dtype != torch.long:
                raise BatchMismatchError(f"task indices must be a LongTensor, got {tasks.dtype}")
            # Not while compiling (a host sync would break the graph) or capturing a CUDA graph (not allowed).
            if not torch.compiler.is_compiling() and not (tasks.is_cuda and torch.cuda.is_current_stream_capturing()):
                self.check_task_indices(tasks)
            return tasks.to(self.class_counts.device)
        names = list(tasks)
        if len(names) != batch:
            raise BatchMismatchError(f"got {len(names)} task names for a batch of {batch} images")
        unique = set(names)
        if len(unique) == 1:
            return self.task_index(names[0])
        lookup = {n: self.task_index(n) for n in unique}
        return torch.tensor([lookup[n] for n in names], dtype=torch.long, device=self.class_counts.device)

    def check_task_indices(self, tasks: torch.Tensor) -> None:
        """Raise ``TaskNotFoundError`` for an index outside ``[0, num_tasks)``.

        One host sync; ``forward`` runs it except while compiling or capturing a CUDA graph, where the caller
        checks instead (an out-of-range index on CUDA would be a device-side assert or a wild read).
        """
        if tasks.numel():
            low, high = int(tasks.min()), int(tasks.max())
            if low < 0 or high >= len(self.task_names):
                raise TaskNotFoundError(
                    f"task index {low if low < 0 else high} is out of range for {len(self.task_names)} tasks"
                )

    def _backbone_features(self, images: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        self.routing.index = index
        try:
            return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)
        finally:
            self.routing.index = None

    def call_backbone(
        self, images: torch.Tensor, tasks: Tasks, fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``fn(backbone, images)`` with each sample's own γ/β: for other ways through the backbone than
        :meth:`forward_features` (e.g. ``forward_intermediates``)."""
        self.routing.index = self.resolve_tasks(tasks, images.shape[0])
        try:
            return fn(self.backbone, images)
        finally:
            self.routing.index = None

    def forward_features(self, images: torch.Tensor, tasks: Tasks) -> torch.Tensor:
        """Pre-logits features ``[B, D]`` with each sample's own γ/β."""
        return self._backbone_features(images, self.resolve_tasks(tasks, images.shape[0]))

    def forward(self, images: torch.Tensor, tasks: Tasks) -> torch.Tensor:
        """Logits ``[B, max_classes]``; columns past a sample's own class count are ``-inf``."""
        index = self.resolve_tasks(tasks, images.shape[0])
        return self.head(self._backbone_features(images, index), index)

    def head(self, features: torch.Tensor, index: int | torch.Tensor) -> torch.Tensor:
        """Apply each sample's task head to its features, padding with ``-inf``."""
        features = features.to(self.head_weight.dtype)
        if isinstance(index, int):
            # Only the task's own columns are computed, so its logits do not depend on other tasks' widths.
            k = self._counts[index]
            logits = torch.addmm(self.head_bias[index, :k], features, self.head_weight[index, :k].t())
            return nn.functional.pad(logits, (0, self.max_classes - k), value=float("-inf"))
        logits = (self.head_weight[index] * features.unsqueeze(1)).sum(-1) + self.head_bias[index]
        columns = torch.arange(self.max_classes, device=features.device)
        invalid = columns.unsqueeze(0) >= self.class_counts[index].unsqueeze(1)
        return logits.masked_fill(invalid, float("-inf"))

    def fold(self, name: str) -> nn.Module:
        """A plain timm model of the backbone's class with task ``name`` folded in (see :mod:`ssf_tasks.fold`)."""
        return fold_task(self, name)


def _like(table: nn.Parameter, values: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(values, requires_grad=table.requires_grad)


def _append_rows(module: nn.Module, attr: str, rows: torch.Tensor) -> None:
    table = getattr(module, attr)
    setattr(module, attr, _like(table, torch.cat([table.detach(), rows.to(table)])))
