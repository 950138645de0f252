"""``ssf-tasks bench ...``: the GPU benchmarks of :mod:`ssf_tasks.bench`, from the command line.

Each command runs its variants side by side in one process on one card and prints one JSON row per variant
(relative error against the eager reference next to each compiled time). See BENCHMARKS.md for the results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer

from ssf_tasks import bench
from ssf_tasks.errors import SSFTasksError

__all__ = ["app"]

app = typer.Typer(
    help="GPU benchmarks: mixed-task inference, task scale, training step, folded model.", no_args_is_help=True
)

Model = Annotated[str, typer.Option(help="timm model name (random init: speed does not depend on weights)")]
Repeats = Annotated[int, typer.Option(min=3, help="timed repeats per variant (the median is reported)")]
Out = Annotated[Path | None, typer.Option(help="also write every row as JSON to this file")]


def _run(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        raise SSFTasksError("the benchmarks need a CUDA device (none is visible to torch)")
    code = bench.main(argv)
    if code:
        raise typer.Exit(code)


def _common(model: str, repeats: int, out: Path | None) -> list[str]:
    return ["--model", model, "--repeats", str(repeats), *(["--out", str(out)] if out else [])]


@app.command()
def inference(
    model: Model = "vit_base_patch16_224",
    batches: Annotated[list[int], typer.Option("--batch", help="batch sizes (repeat the option)")] = [256, 8, 1],  # noqa: B006
    mode: Annotated[str | None, typer.Option(help="torch.compile mode for every batch size")] = None,
    peft: Annotated[bool, typer.Option(help="include PEFT LoRA mixed-adapter batches")] = True,
    loop: Annotated[bool, typer.Option(help="include the loop-over-tasks baseline")] = True,
    repeats: Repeats = 20,
    out: Out = None,
) -> None:
    """Mixed-task forward (64 tasks) against the compiled plain backbone, a per-task loop and PEFT LoRA."""
    argv = ["inference", *_common(model, repeats, out), "--batches", *map(str, batches)]
    argv += [*(["--mode", mode] if mode else []), *([] if peft else ["--no-peft"]), *([] if loop else ["--no-loop"])]
    _run(argv)


@app.command()
def scale(model: Model = "vit_base_patch16_224", repeats: Repeats = 20, out: Out = None) -> None:
    """Batch 256 with 1, 1,000 and 10,000 tasks resident on the GPU."""
    _run(["scale", *_common(model, repeats, out)])


@app.command()
def training(
    model: Model = "vit_base_patch16_224",
    peft: Annotated[bool, typer.Option(help="include PEFT LoRA r=8")] = True,
    profile: Annotated[bool, typer.Option(help="print each variant's top CUDA kernels")] = False,
    mode: Annotated[str | None, typer.Option(help="torch.compile mode for every compiled variant")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="timing passes over all variants, in alternation")] = 5,
    repeats: Repeats = 20,
    out: Out = None,
) -> None:
    """One AdamW step at batch 64: full fine-tuning, linear probe, LoRA, SSF (compiled and eager)."""
    _run(
        [
            "training",
            *_common(model, repeats, out),
            *([] if peft else ["--no-peft"]),
            *(["--profile"] if profile else []),
            *(["--mode", mode] if mode else []),
            "--rounds",
            str(rounds),
        ]
    )


@app.command()
def fold(model: Model = "vit_base_patch16_224", repeats: Repeats = 20, out: Out = None) -> None:
    """Latency of a folded (exported) task model against the plain timm model."""
    _run(["fold", *_common(model, repeats, out)])
