"""What the GPU benchmarks share: timing, relative errors, compiling, rows, and the set-up of a run.

Why each piece: a time is the median of CUDA-event timings after a warm-up, so one slow launch or a clock change does
not decide it; every fast path is checked against its eager reference before it is timed (``rel_error``), since a
time says nothing if the result differs; ``compile_fresh`` resets dynamo first, so that no variant reuses another's
graph; every row is printed as one JSON line as soon as it exists, so a run cut short still leaves its rows.

The ViT baselines "(patch embedding as one GEMM)" live here too (``with_patches_gemm``): ssf-tasks runs a patchify
conv as one GEMM on CUDA, and the plain model's rows with the same stem show how much of a ratio that alone moves.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from ssf_tasks.kernels.frozen_op import is_patchify, patchify_linear

__all__ = [
    "Row",
    "compile_fresh",
    "environment",
    "graph_breaks",
    "has_patchify_stem",
    "print_profile",
    "rel_error",
    "report",
    "samples",
    "setup_cuda",
    "timed",
    "with_patches_gemm",
    "write_rows",
]

Row = dict[str, Any]


def timed(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, timed with CUDA events after ``warmup`` runs."""
    return statistics.median(samples(fn, warmup=warmup, repeats=repeats))


def samples(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``fn`` (CUDA events, synchronised), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def print_profile(fn: Callable[[], Any], label: str = "") -> None:
    """The top CUDA kernels of three calls of ``fn``: where the time of a variant goes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # CUDA activity also records the host's launch calls (runtime and driver API); only device events are kernels.
    kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(a.self_device_time_total for a in kernels) / 3000.0
    launches = sum(a.count for a in kernels) / 3
    # Kernel time below the wall-clock time of a call means the GPU waited (for launches from the host).
    print(f"--- profile: {label}: {kernel_ms:.2f} ms of kernels and {launches:.0f} kernels per call")
    print(averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))


def graph_breaks() -> int:
    """Graph breaks dynamo counted since the last ``compile_fresh``."""
    return int(sum(torch._dynamo.utils.counters["graph_break"].values()))


def rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (finite entries of the reference)."""
    result, reference = result.float(), reference.float()
    finite = torch.isfinite(reference)
    diff = (result[finite] - reference[finite]).abs().max()
    return float(diff / reference[finite].abs().max().clamp_min(1e-12))


def compile_fresh(module: nn.Module | Callable, mode: str | None) -> Callable:
    """``torch.compile`` (static shapes) after a reset of dynamo: no graph or counter left by another variant."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(module, mode=mode, dynamic=False)


def report(rows: list[Row], row: Row) -> None:
    """Keep ``row`` and print it as one JSON line at once."""
    rows.append(row)
    print(json.dumps(row), flush=True)


class _PatchesGemmConv(nn.Conv2d):
    """A patchify ``nn.Conv2d`` run as ssf-tasks runs it, one GEMM (``patchify_linear``); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patchify_linear(x, self.weight, self.bias)


def has_patchify_stem(model: nn.Module) -> bool:
    """The model embeds patches with a conv that ssf-tasks runs as one GEMM on CUDA (ViT, DeiT, ...)."""
    conv = getattr(getattr(model, "patch_embed", None), "proj", None)
    return type(conv) is nn.Conv2d and is_patchify(conv)


def with_patches_gemm(model: nn.Module) -> nn.Module:
    """``model`` with its ViT patch embedding run as one GEMM, as ssf-tasks runs it on CUDA: the baselines'
    rows "(patch embedding as one GEMM)" show how much of a ratio that alone moves (cuDNN is slow at it)."""
    if not has_patchify_stem(model):
        raise ValueError(f"no patchify conv at patch_embed.proj: {getattr(model, 'patch_embed', None)}")
    model.patch_embed.proj.__class__ = _PatchesGemmConv
    return model


def setup_cuda(cudnn_benchmark: bool = False) -> None:
    """The same numerics for every variant of a run: TF32 matmuls and convs; ``cudnn_benchmark`` lets cuDNN time
    its kernels for each conv shape (it changes the convs' speed, so every variant gets the same setting)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = cudnn_benchmark


def environment() -> Row:
    """The card and software versions a set of numbers was measured with."""
    row: Row = {"torch": torch.__version__, "timm": timm.__version__}
    if torch.cuda.is_available():
        row["card"] = torch.cuda.get_device_name()
    try:
        import peft

        row["peft"] = peft.__version__
    except ImportError:
        pass
    return row


def write_rows(path: Path | str, env: Row, started: float, rows: list[Row]) -> None:
    """All rows of a run as one JSON file, with its environment and its length in seconds since ``started``."""
    with open(path, "w") as handle:
        json.dump({"environment": env, "seconds": time.time() - started, "rows": rows}, handle, indent=1)
