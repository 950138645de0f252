"""One rank of a data-parallel training run: its share of the data, its sums over all ranks, its DDP wrapper.

:func:`ssf_tasks.train.train_task` takes a :class:`DataParallel` when it runs as one of several processes of a
``torch.distributed`` process group (:mod:`ssf_tasks.distributed` starts them). Everything the loop does differently
there goes through this object, so that the loop reads the same with one process or many:

* training batches come from a :class:`~torch.utils.data.DistributedSampler` (each rank a disjoint share of a fresh
  permutation every epoch, ``batch_size / world`` images per rank, so a step still sees ``batch_size`` images);
* evaluation and the probe's features are computed on a strided shard of the split (no padding, no image twice) and
  then summed or gathered, so val/test top-1 is over the whole split, each image exactly once;
* only the task's own γ/β and head go into :class:`~torch.nn.parallel.DistributedDataParallel`: a small module that
  holds just those parameters is wrapped, so the gradient all-reduce carries a few hundred KB a step and the frozen
  backbone is neither broadcast nor reduced. A communication hook counts the numbers each step reduces.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import TrainConfig
from .errors import TrainingError

if TYPE_CHECKING:
    from .model import MultiTaskSSF

__all__ = ["DataParallel", "per_rank_batch"]


def per_rank_batch(batch_size: int, world: int) -> int:
    """Images per rank and step: the global batch stays ``batch_size``, so it must split evenly.

    Raises:
        TrainingError: ``batch_size`` is not a multiple of ``world`` (``field="batch_size"``).
    """
    if world < 1:
        raise TrainingError(f"nproc must be at least 1, got {world}", field="nproc")
    if batch_size % world:
        raise TrainingError(
            f"batch_size {batch_size} does not split over {world} processes: a step takes batch_size images in all, "
            f"an equal share from each process; use a multiple of {world}",
            field="batch_size",
        )
    return batch_size // world


class _ReshufflingSampler(DistributedSampler):
    """A ``DistributedSampler`` that moves to the next epoch's permutation by itself after every pass, as the
    one-process loader's ``RandomSampler`` does, so the training loop needs no ``set_epoch`` call."""

    def __iter__(self) -> Iterator[int]:
        order = super().__iter__()  # the permutation of the current epoch, already drawn
        self.set_epoch(self.epoch + 1)
        return order


class _TaskRows(nn.Module):
    """The module DDP wraps: it owns only the task's trainable tables (the ones ``isolate_tasks`` yields) and runs
    the whole model for that task. The model itself is held as a plain callable, not a submodule, so none of its
    frozen backbone parameters or buffers is seen, broadcast or reduced by DDP."""

    def __init__(self, model: MultiTaskSSF, name: str, params: Sequence[nn.Parameter]) -> None:
        super().__init__()
        self.rows = nn.ParameterList(params)
        self.run = partial(model, tasks=name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.run(images)


@dataclass
class DataParallel:
    """This process's place in an initialised ``torch.distributed`` process group.

    Attributes:
        rank: This process's rank.
        world: How many processes train together.
        device: Where collectives' tensors live: the CPU for gloo, this rank's GPU for NCCL.
        bucket_numbers: Numbers all-reduced per gradient bucket (bucket index -> count), filled by the DDP
            communication hook on every backward.
    """

    rank: int
    world: int
    device: torch.device
    bucket_numbers: dict[int, int] = field(default_factory=dict)

    @property
    def reduced_per_step(self) -> int:
        """How many numbers one training step all-reduces (0 before the first backward)."""
        return sum(self.bucket_numbers.values())

    # ------------------------------------------------------------------------------------------------- data
    def train_loader(self, dataset: Dataset, config: TrainConfig) -> DataLoader:
        """This rank's training batches: ``batch_size / world`` images of a new permutation every epoch.

        When the split does not divide by ``world`` the sampler repeats up to ``world - 1`` images per epoch so
        that every rank takes the same number of steps (DDP needs each step on every rank).
        """
        sampler = _ReshufflingSampler(
            dataset, num_replicas=self.world, rank=self.rank, shuffle=True, seed=config.seed, drop_last=False
        )
        return DataLoader(
            dataset,
            batch_size=per_rank_batch(config.batch_size, self.world),
            sampler=sampler,
            num_workers=config.num_workers,
            # Seeds the loader's worker processes: each rank draws its own augmentations.
            generator=torch.Generator().manual_seed(config.seed + self.rank),
            drop_last=False,
            pin_memory=self.device.type == "cuda",
        )

    def shard(self, dataset: Dataset) -> Dataset:
        """Images ``rank, rank + world, ...`` of ``dataset``: the shards cover it exactly once, with no padding."""
        return Subset(dataset, range(self.rank, len(dataset), self.world))

    def gather(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """Undo :meth:`shard` along dimension 0: every rank gets all ``total`` rows, in the dataset's order."""
        size = math.ceil(total / self.world)
        padded = part.new_zeros((size, *part.shape[1:]))
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        whole = part.new_empty((total, *part.shape[1:]))
        for rank, rows in enumerate(parts):
            whole[rank :: self.world] = rows[: len(range(rank, total, self.world))]
        return whole

    # ----------------------------------------------------------------------------------------- collectives
    def sum(self, *values: float) -> tuple[float, ...]:
        """Each value summed over all ranks (float64, so counts of images stay exact)."""
        totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)
        return tuple(totals.tolist())

    def broadcast_task(self, model: MultiTaskSSF, name: str, score: float | None) -> float | None:
        """Give every rank rank 0's γ/β and head of task ``name``, and rank 0's ``score`` of that state.

        Used after the probe head is fitted: every rank fits it on the same gathered features, but only bit-equal
        starting points (and scores, which decide the best epoch and early stopping) keep the ranks in step.
        """
        state = model.task_state_dict(name)
        for tensor in state.values():
            dist.broadcast(tensor, src=0)
        model.update_task(name, state)
        value = torch.tensor([math.nan if score is None else score], dtype=torch.float64, device=self.device)
        dist.broadcast(value, src=0)
        return None if math.isnan(value.item()) else value.item()

    # ------------------------------------------------------------------------------------------------ DDP
    def wrap(self, model: MultiTaskSSF, name: str, params: Sequence[nn.Parameter]) -> nn.Module:
        """DDP over task ``name``'s trainable tables only; call it with a batch of images to get its logits.

        Args:
            model: The model, inside ``model.isolate_tasks([name])``.
            name: The task being trained.
            params: The tables ``isolate_tasks`` yielded (γ/β of every site, the head).

        Raises:
            TrainingError: the tables hold more or fewer numbers than the task's γ/β and head (a parameter of the
                backbone would otherwise be averaged across ranks every step).
        """
        rows = _TaskRows(model, name, params)
        expected = model.ssf_parameters_per_task + model.head_weight[0].numel() + model.head_bias[0].numel()
        trainable = sum(p.numel() for p in rows.parameters() if p.requires_grad)
        if trainable != expected:
            raise TrainingError(
                f"data-parallel training of {name!r} would all-reduce {trainable} numbers a step, but the task's "
                f"γ/β and head hold {expected}"
            )
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(rows, device_ids=device_ids)
        wrapped.register_comm_hook(self, _count_and_allreduce)
        return wrapped


def _count_and_allreduce(state: DataParallel, bucket):
    """DDP's own averaging all-reduce of a ``dist.GradBucket``, after noting how many numbers the bucket holds.

    The bucket and the returned future are not annotated: DDP compares the annotations with ``dist.GradBucket`` and
    ``torch.futures.Future[torch.Tensor]``, and under ``from __future__ import annotations`` they would be strings.
    """
    state.bucket_numbers[bucket.index()] = bucket.buffer().numel()
    return default_hooks.allreduce_hook(None, bucket)
