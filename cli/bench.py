"""``ssf-tasks bench ...``: the GPU benchmarks of ``ssf_tasks_bench`` (``benchmarks/``), from the command line.

Each command calls one benchmark function with its options. The benchmarks run their variants side by side in one
process on one card and print one JSON row per variant (relative error against the eager reference next to each
compiled time), after one row naming the card and the versions; ``--out`` also writes every row to one JSON file.
``bench kernel NAME`` runs a kernel micro-benchmark (``ssf_tasks_bench.kernels``). The numbers are in BENCHMARKS.md.

torch, timm and the benchmarks are imported inside the commands, so that ``ssf-tasks --help`` stays fast; every
timing command first checks that torch sees a CUDA device (``_require_cuda``), which is a one-line error otherwise.
``bench accuracy`` measures top-1, not time, and runs on the CPU too (``ssf_tasks_bench.accuracy``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import typer

from ssf_tasks.errors import SSFTasksError

__all__ = ["app"]

app = typer.Typer(
    help="Benchmarks: mixed-task inference, task scale, training step, folded model, kernels (GPU); accuracy of SSF "
    "against the baselines (CPU or GPU). See BENCHMARKS.md.",
    no_args_is_help=True,
)

DEFAULT_MODEL = "vit_base_patch16_224"
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]

Model = Annotated[str, typer.Option("--model", help="timm model name (random init: speed does not depend on weights)")]
Repeats = Annotated[int, typer.Option("--repeats", min=3, help="timed repeats per variant (the median is reported)")]
Out = Annotated[Path | None, typer.Option("--out", metavar="FILE", help="also write every row as JSON to this file")]
Peft = Annotated[bool, typer.Option("--peft/--no-peft", help="include PEFT LoRA r=8 (needs peft installed)")]
Profile = Annotated[bool, typer.Option("--profile", help="print the top CUDA kernels of each variant")]
CudnnBenchmark = Annotated[
    bool, typer.Option("--cudnn-benchmark", help="let cuDNN time its kernels for each conv shape (every variant)")
]


def _require_cuda() -> None:
    """The one check every benchmark command makes first."""
    import torch

    if not torch.cuda.is_available():
        raise SSFTasksError("the benchmarks need a CUDA device (none is visible to torch)")


@contextmanager
def _recorded(out: Path | None, cudnn_benchmark: bool = False) -> Iterator[list[dict[str, Any]]]:
    """A benchmark run: the CUDA check, the same numerics for every variant, the environment as the first JSON row;
    the caller adds the benchmark's rows to the list given, and with ``out`` they are written to it at the end."""
    _require_cuda()
    from ssf_tasks_bench import common

    common.setup_cuda(cudnn_benchmark)
    started = time.time()
    env = common.environment()
    print(json.dumps(env), flush=True)
    rows: list[dict[str, Any]] = []
    yield rows
    if out is not None:
        common.write_rows(out, env, started, rows)


@app.command()
def inference(
    batches: Annotated[
        list[int], typer.Option("--batch", min=1, metavar="N", help="batch sizes (repeat the option)")
    ] = [256, 8, 1],  # noqa: B006
    model: Model = DEFAULT_MODEL,
    peft: Peft = True,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="include the loop-over-tasks baseline")] = True,
    mode: Annotated[
        CompileMode | None,
        typer.Option("--mode", help="torch.compile mode for every batch size [default: reduce-overhead up to 8]"),
    ] = None,
    profile: Profile = False,
    repeats: Repeats = 20,
    cudnn_benchmark: CudnnBenchmark = False,
    out: Out = None,
) -> None:
    """Mixed-task forward (64 tasks) against the compiled plain backbone, a per-task loop and PEFT LoRA."""
    with _recorded(out, cudnn_benchmark) as rows:
        from ssf_tasks_bench.inference import bench_inference

        rows += bench_inference(
            model,
            tuple(batches),
            peft=peft,
            loop=loop,
            repeats=repeats,
            compile_mode=mode,
            profile=profile,
        )


@app.command()
def scale(
    tasks: Annotated[
        list[int], typer.Option("--tasks", min=1, metavar="N", help="tasks resident on the GPU (repeat the option)")
    ] = [1, 1000, 10000],  # noqa: B006
    model: Model = DEFAULT_MODEL,
    repeats: Repeats = 20,
    cudnn_benchmark: CudnnBenchmark = False,
    out: Out = None,
) -> None:
    """A mixed batch of 256 with more and more tasks resident on the GPU (by default 1, 1,000 and 10,000)."""
    with _recorded(out, cudnn_benchmark) as rows:
        from ssf_tasks_bench.inference import bench_scale

        rows += bench_scale(model, task_counts=tuple(tasks), repeats=repeats)


@app.command()
def training(
    only: Annotated[
        list[str],
        typer.Option(
            "--only",
            metavar="LABEL",
            help="only variants whose label contains LABEL (repeat the option); also picks compiler settings "
            "('budget=0.2', 'combo_kernels', 'cpp_wrapper')",
        ),
    ] = [],  # noqa: B006
    eager_only: Annotated[bool, typer.Option("--eager-only", help="skip torch.compile")] = False,
    compiled_only: Annotated[bool, typer.Option("--compiled-only", help="skip the eager variants")] = False,
    mode: Annotated[CompileMode | None, typer.Option("--mode", help="torch.compile mode for every variant")] = None,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="timing passes over all variants, in turn")] = 5,
    model: Model = DEFAULT_MODEL,
    peft: Peft = True,
    profile: Profile = False,
    repeats: Repeats = 20,
    cudnn_benchmark: CudnnBenchmark = False,
    out: Out = None,
) -> None:
    """One AdamW step at batch 64: full fine-tuning, linear probe, LoRA, SSF (compiled and eager)."""
    if eager_only and compiled_only:
        raise typer.BadParameter("give at most one of --eager-only and --compiled-only", param_hint="--compiled-only")
    compiled = (False,) if eager_only else (True,) if compiled_only else (True, False)
    with _recorded(out, cudnn_benchmark) as rows:
        from ssf_tasks_bench.training import bench_training

        rows += bench_training(
            model,
            compiled_variants=compiled,
            peft=peft,
            repeats=repeats,
            profile=profile,
            only=tuple(only),
            rounds=rounds,
            compile_mode=mode,
        )


@app.command()
def fold(
    model: Model = DEFAULT_MODEL,
    repeats: Repeats = 20,
    cudnn_benchmark: CudnnBenchmark = False,
    out: Out = None,
) -> None:
    """Latency of a folded (exported) task model against the plain timm model."""
    with _recorded(out, cudnn_benchmark) as rows:
        from ssf_tasks_bench.fold import bench_fold

        rows += bench_fold(model, repeats=repeats)


KernelName = Literal[
    "attention", "mixed-gelu", "gelu-backward", "qkv-backward", "residual-norm", "patch-embed", "tiles"
]
# The benchmarks of kernels whose tile is a set of module constants, and ``tiles``, which runs all of those.
_SWEPT = frozenset({"mixed-gelu", "gelu-backward", "qkv-backward", "residual-norm", "tiles"})


@app.command()
def kernel(
    name: Annotated[
        KernelName, typer.Argument(metavar="NAME", help="the kernel micro-benchmark to run", show_default=False)
    ],
    sweep: Annotated[
        bool, typer.Option("--sweep", help="also time a grid of tiles (" + ", ".join(sorted(_SWEPT)) + ")")
    ] = False,
) -> None:
    """A kernel micro-benchmark, at one ViT-B shape, against what torch.compile makes of the same work.

    attention: mixed-batch attention with the qkv SSF on its loads, against SDPA.
    mixed-gelu: fc1's per-sample SSF with GELU.
    gelu-backward, qkv-backward, residual-norm: the training kernels' backward with their column sums.
    patch-embed: the patchify conv as cuDNN runs it and as one GEMM.
    tiles: the four kernels with a tile sweep, one after another, and the fastest tile of each.
    """
    if sweep and name not in _SWEPT:
        raise typer.BadParameter(f"{name} has no tile sweep (only {', '.join(sorted(_SWEPT))})", param_hint="--sweep")
    _require_cuda()
    import importlib

    try:
        module = importlib.import_module(f"ssf_tasks_bench.kernels.{name.replace('-', '_')}")
    except ImportError as error:
        if (error.name or "").split(".")[0] != "triton":
            raise
        raise SSFTasksError(f"bench kernel {name} needs Triton, which is not installed") from None
    if name in _SWEPT:
        module.main(sweep=sweep)
    else:
        module.main()


Precision = Annotated[Literal["fp32", "bf16"], typer.Option("--precision", help="forward precision (bf16 autocast)")]
Workdir = Annotated[
    Path, typer.Option("--workdir", help="folder for the run's registry and JPEG files (created)", file_okay=False)
]


@app.command()
def predict(
    model: Model = DEFAULT_MODEL,
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="tasks registered (random γ/β and heads)")] = 64,
    images: Annotated[int, typer.Option("--images", min=1, help="224-px JPEG files in the mixed manifest")] = 8192,
    batch: Annotated[int, typer.Option("--batch", min=1)] = 256,
    precision: Precision = "bf16",
    workdir: Workdir = Path("bench-predict"),
    out: Out = None,
) -> None:
    """predict from JPEG files, end to end (the engine warm, and the command cold), beside the mixed forward alone."""
    with _recorded(out) as rows:
        from ssf_tasks_bench.serving import bench_predict

        rows += bench_predict(workdir, model, tasks, images, batch, precision)


@app.command()
def serve(
    model: Model = DEFAULT_MODEL,
    tasks: Annotated[int, typer.Option("--tasks", min=1, help="tasks registered (random γ/β and heads)")] = 64,
    batch: Annotated[int, typer.Option("--batch", min=1, help="the server's --max-batch-size")] = 256,
    clients: Annotated[int, typer.Option("--clients", min=1, help="concurrent clients over loopback")] = 64,
    seconds: Annotated[float, typer.Option("--seconds", min=1, help="length of each load phase")] = 12,
    processes: Annotated[int, typer.Option("--processes", min=1, help="client processes")] = 8,
    http_workers: Annotated[
        list[int] | None,
        typer.Option("--http-workers", min=1, help="the server's --http-workers; repeat to compare (default 1 and 8)"),
    ] = None,
    precision: Precision = "bf16",
    workdir: Workdir = Path("bench-serve"),
    out: Out = None,
) -> None:
    """ssf-tasks serve under concurrent clients (full and half load, 1 and 8 images a request), beside the mixed
    forward alone, and how soon a task registered while serving answers."""
    with _recorded(out) as rows:
        from ssf_tasks_bench.serving import bench_serve

        workers = tuple(http_workers or (1, 8))
        rows += bench_serve(workdir, model, tasks, batch, precision, clients, seconds, processes, http_workers=workers)


Method = Literal[
    "linear",
    "bitfit",
    "full",
    "lora",
    "ssf",
    "ssf-defaults",
    "ssf-scale",
    "ssf-shift",
    "ssf-attn",
    "ssf-mlp",
    "ssf-identity-init",
    "ssf-random-head",
]


def _backbone_of(ctx: typer.Context, backbone: str | None, model: str | None, weights: str | None):
    """The backbone record a benchmark trains on: a registered one (``--backbone``), or ``--model`` with its
    ``--weights`` (not stored)."""
    if backbone is not None:
        from sqlalchemy.orm import Session

        from ssf_tasks import registry

        from .state import engine_of

        with Session(engine_of(ctx)) as s:
            return registry.get_backbone(s, backbone)
    from ssf_tasks_bench.accuracy import backbone_record

    assert model is not None
    return backbone_record(model, weights)


def _grids(values: list[str]) -> dict[str, tuple[float, ...]]:
    """``--grid METHOD=V1,V2,...`` options as a dict of grids."""
    grids: dict[str, tuple[float, ...]] = {}
    for value in values:
        method, _, numbers = value.partition("=")
        try:
            grid = tuple(float(v) for v in numbers.split(","))
        except ValueError:
            grid = ()
        if method not in get_args(Method) or not grid or any(v <= 0 for v in grid):
            raise typer.BadParameter(
                f"{value!r}: expected METHOD=V1,V2,... with METHOD one of {', '.join(get_args(Method))} and "
                "positive values",
                param_hint="--grid",
            )
        grids[method] = grid
    return grids


@app.command()
def accuracy(
    ctx: typer.Context,
    data: Annotated[
        list[Path],
        typer.Option("--data", metavar="DIR", help="ImageFolder tree with train/, val/, test/ (repeat the option)"),
    ],
    backbone: Annotated[str | None, typer.Option("--backbone", help="a backbone of the registry")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="a timm model instead of --backbone (with --weights)")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="weights of --model: a file, package:NAME or hub[:TAG]")
    ] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            metavar="METHOD",
            help="linear, bitfit, full, lora, ssf, ssf-defaults (task add with no flags), or an SSF ablation: "
            "ssf-scale, ssf-shift, ssf-attn, ssf-mlp, ssf-identity-init, ssf-random-head (repeat the option) "
            "[default: the first six]",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="final runs per method: mean ± std")] = 3,
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            metavar="METHOD=V1,V2,...",
            help="a method's grid: learning rates, or L2 strengths for linear (repeat the option)",
        ),
    ] = [],  # noqa: B006
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 1e-4,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", min=0)] = 1,
    protocol: Annotated[Literal["vtab", "fgvc"], typer.Option("--protocol")] = "vtab",
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="square input side (default: the backbone's)")
    ] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    num_workers: Annotated[int, typer.Option("--num-workers", min=0)] = 0,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", file_okay=False, help="keep the SSF runs' registry here (default: a temporary one)"),
    ] = None,
    out: Out = None,
) -> None:
    """Top-1 of linear probe, BitFit, full fine-tuning, LoRA and SSF (as task add trains it) on each dataset.

    Each method's learning rate (L2 strength for the linear probe) is chosen on val/ from a small grid; the method is
    then trained on train/ + val/ once per seed and scored on test/. Runs on the CPU too (--device cpu). The table
    goes to stdout in markdown, progress to stderr.
    """
    if (backbone is None) == (model is None):
        raise typer.BadParameter("give either --backbone or --model (with --weights)", param_hint="--backbone")
    if weights is not None and model is None:
        raise typer.BadParameter("--weights goes with --model", param_hint="--weights")
    for method in methods or ():
        if method not in get_args(Method):
            raise typer.BadParameter(
                f"unknown method {method!r} (use {', '.join(get_args(Method))})", param_hint="--method"
            )
    grids = _grids(grid)
    from ssf_tasks.config import TrainConfig
    from ssf_tasks.train import resolve_device
    from ssf_tasks_bench import common
    from ssf_tasks_bench.accuracy import METHODS, bench_accuracy, markdown_table

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        transform=protocol,
        input_size=input_size,
        device=device,
        num_workers=num_workers,
    )
    resolve_device(device)  # asking for CUDA without one fails here, before any work
    record = _backbone_of(ctx, backbone, model, weights)
    started = time.time()
    env = {**common.environment(), "backbone": record.model_dump(mode="json"), "config": config.model_dump()}
    rows = bench_accuracy(
        [str(d) for d in data],
        record,
        config,
        methods=tuple(methods or METHODS),
        seeds=seeds,
        grids=grids,
        workdir=workdir,
    )
    typer.echo(markdown_table(rows))
    if out is not None:
        common.write_rows(out, env, started, rows)


@app.command()
def routing(
    ctx: typer.Context,
    data: Annotated[
        list[Path],
        typer.Option("--data", metavar="DIR", help="ImageFolder tree registered as a task (repeat the option)"),
    ],
    unknown: Annotated[
        list[Path],
        typer.Option("--unknown", metavar="DIR", help="images of a dataset not registered: the open-set check"),
    ] = [],  # noqa: B006
    backbone: Annotated[str | None, typer.Option("--backbone", help="a backbone of the registry")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="a timm model instead of --backbone (with --weights)")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="weights of --model: a file, package:NAME or hub[:TAG]")
    ] = None,
    methods: Annotated[
        list[str] | None, typer.Option("--method", metavar="METHOD", help="knn or prototype [default: both]")
    ] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="task add's epochs for each dataset")] = 10,
    test_limit: Annotated[
        int | None, typer.Option("--test-limit", min=1, help="test images per dataset (spread over the split)")
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1)] = 64,
    precision: Precision = "fp32",
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", file_okay=False, help="keep the tasks' registry here and reuse it on a re-run"),
    ] = None,
    out: Out = None,
) -> None:
    """Task-agnostic inference (task: auto): task selection, top-1 with auto against the task given, open-set
    rejection and cost per image, for each routing method. Runs on the CPU too."""
    from ssf_tasks.routing import RoutingMethod

    if (backbone is None) == (model is None):
        raise typer.BadParameter("give either --backbone or --model (with --weights)", param_hint="--backbone")
    for method in methods or ():
        if method not in get_args(RoutingMethod):
            raise typer.BadParameter(f"unknown routing method {method!r} (use knn or prototype)", param_hint="--method")
    from ssf_tasks.config import TrainConfig
    from ssf_tasks.train import resolve_device
    from ssf_tasks_bench import common
    from ssf_tasks_bench.routing import bench_routing, markdown_table

    config = TrainConfig(epochs=epochs, device=device)
    resolve_device(device)
    record = _backbone_of(ctx, backbone, model, weights)
    started = time.time()
    rows = bench_routing(
        [str(d) for d in data],
        [str(u) for u in unknown],
        record,
        config,
        methods=tuple(methods or get_args(RoutingMethod)),
        test_limit=test_limit,
        batch=batch,
        precision=precision,
        workdir=workdir,
    )
    typer.echo(markdown_table(rows))
    if out is not None:
        env = {**common.environment(), "backbone": record.model_dump(mode="json"), "config": config.model_dump()}
        common.write_rows(out, env, started, rows)


@app.command("warm-start")
def warm_start(
    ctx: typer.Context,
    source: Annotated[
        list[Path],
        typer.Option("--source", metavar="DIR", help="ImageFolder tree registered first (repeat: one per --target)"),
    ],
    target: Annotated[
        list[Path],
        typer.Option("--target", metavar="DIR", help="ImageFolder tree trained cold and from its --source"),
    ],
    backbone: Annotated[str | None, typer.Option("--backbone", help="a backbone of the registry")] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="a timm model instead of --backbone (with --weights)")
    ] = None,
    weights: Annotated[
        str | None, typer.Option("--weights", help="weights of --model: a file, package:NAME or hub[:TAG]")
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="cold and warm runs per pair")] = 3,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    lr: Annotated[float, typer.Option("--lr", min=0.0)] = 5e-3,
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="square input side (default: the backbone's)")
    ] = None,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    num_workers: Annotated[int, typer.Option("--num-workers", min=0)] = 0,
    workdir: Annotated[
        Path | None,
        typer.Option("--workdir", file_okay=False, help="keep the runs' registry here (default: a temporary one)"),
    ] = None,
    out: Out = None,
) -> None:
    """Warm start (task add --init-from SOURCE) against cold start on pairs of related tasks: epochs to the cold
    runs' best val top-1, test top-1, and which task --init-from auto picks. Runs on the CPU too."""
    if (backbone is None) == (model is None):
        raise typer.BadParameter("give either --backbone or --model (with --weights)", param_hint="--backbone")
    if len(source) != len(target):
        raise typer.BadParameter(
            f"{len(source)} --source and {len(target)} --target: give one --source per --target", param_hint="--source"
        )
    from ssf_tasks.config import TrainConfig
    from ssf_tasks.train import resolve_device
    from ssf_tasks_bench import common
    from ssf_tasks_bench.warm_start import bench_warm_start, markdown_table

    config = TrainConfig(epochs=epochs, lr=lr, input_size=input_size, device=device, num_workers=num_workers)
    resolve_device(device)
    record = _backbone_of(ctx, backbone, model, weights)
    started = time.time()
    rows = bench_warm_start(
        list(zip(map(str, source), map(str, target), strict=True)),
        record,
        config,
        seeds=seeds,
        workdir=workdir,
        log=lambda line: typer.echo(line, err=True),
    )
    typer.echo(markdown_table(rows))
    if out is not None:
        env = {**common.environment(), "backbone": record.model_dump(mode="json"), "config": config.model_dump()}
        common.write_rows(out, env, started, rows)
