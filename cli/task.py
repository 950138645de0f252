"""``ssf-tasks task ...``: train and store tasks, look at them, evaluate, remove, move between registries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from ssf_tasks.train import TrainProgress


from .state import engine_of, print_table, stderr, stdout

__all__ = ["app"]

app = typer.Typer(help="Train, list, show, plot, evaluate, remove, export and import tasks.", no_args_is_help=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class _ProgressBar:
    """A rich progress bar fed by ``train_task``'s progress reports: loss, accuracy and images per second."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}  loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            console=stderr,
            transient=False,
        )
        self.bar: int | None = None

    def __enter__(self) -> _ProgressBar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, report: TrainProgress) -> None:
        if self.bar is None:
            self.bar = self.progress.add_task(
                f"train {self.name}", total=report.steps, epoch="", loss=0.0, acc=0.0, ips=0.0
            )
        epoch = f"{report.epoch}/{report.epochs}"
        if report.phase == "train":
            self.progress.update(
                self.bar,
                completed=report.step,
                epoch=epoch,
                loss=report.loss,
                acc=report.accuracy,
                ips=report.images_per_second,
            )
        else:
            self.progress.console.print(
                f"epoch {epoch}: train loss {report.loss:.4f}, {report.phase} top-1 {_pct(report.accuracy)}"
            )


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name: a-z, 0-9, '.', '_', '-'.")],
    backbone: Annotated[str, typer.Option("--backbone", help="Registered backbone to train on.")],
    data: Annotated[
        Path, typer.Option("--data", help="ImageFolder tree (train/, val/, test/) or a path,label CSV manifest.")
    ],
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate.")] = 5e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", min=0.0)] = 1e-4,
    warmup_epochs: Annotated[int, typer.Option("--warmup-epochs", min=0)] = 1,
    patience: Annotated[
        int | None, typer.Option("--patience", min=1, help="Stop after this many epochs without val gain.")
    ] = None,
    protocol: Annotated[
        Literal["vtab", "fgvc"],
        typer.Option("--protocol", help="vtab: direct resize, no crop; fgvc: random resized crop + flip."),
    ] = "vtab",
    input_size: Annotated[
        int | None, typer.Option("--input-size", min=8, help="Square input side (default: the backbone's).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
    num_workers: Annotated[int, typer.Option("--num-workers", min=0, help="DataLoader worker processes.")] = 0,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc",
            min=1,
            help="Data-parallel processes (DDP; one GPU each on CUDA, gloo on CPU); --batch-size is split among them.",
        ),
    ] = 1,
    init_from: Annotated[
        str | None,
        typer.Option(
            "--init-from",
            help="Start γ/β from this task (same backbone), or 'auto': from the stored task whose class means are "
            "closest to this dataset's images (a cold start when there is none).",
        ),
    ] = None,
    adapt: Annotated[
        Literal["scale_shift", "scale", "shift"],
        typer.Option("--adapt", help="Train γ and β, or only γ (scale) or only β (shift); the other stays identity."),
    ] = "scale_shift",
    train_sites: Annotated[
        list[str] | None,
        typer.Option(
            "--train-sites",
            help="Train only the sites whose names match this fnmatch pattern (repeatable, e.g. '*.attn.*'); "
            "the others stay identity. Default: every site.",
        ),
    ] = None,
    head_init: Annotated[
        Literal["probe", "random"],
        typer.Option(
            "--head-init",
            help="Start the head as a linear probe fitted on the frozen features (L2 chosen on val/), or at random.",
        ),
    ] = "probe",
    refit: Annotated[
        bool,
        typer.Option(
            "--refit/--no-refit",
            help="After val/ has chosen the best epoch, train again on train/ + val/ for that many epochs and store "
            "that (twice the time; the reported val top-1 is the first run's).",
        ),
    ] = False,
    new_version: Annotated[
        bool, typer.Option("--new-version", help="Add a version to an existing task instead of refusing.")
    ] = False,
) -> None:
    """Train a task's γ/β and head on a frozen backbone and store it; nothing is stored unless training finishes."""
    from ssf_tasks.config import TrainConfig
    from ssf_tasks.training_job import train_and_store

    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        patience=patience,
        transform=protocol,
        input_size=input_size,
        seed=seed,
        device=device,
        num_workers=num_workers,
        init_from=init_from,
        nproc=nproc,
        adapt=adapt,
        train_sites=train_sites or None,
        head_init=head_init,
        refit=refit,
    )
    with _ProgressBar(name) as bar:
        record, result = train_and_store(
            engine_of(ctx), name, backbone, data, config, new_version=new_version, progress=bar
        )
    stdout.print(
        f"stored task '{record.name}' version {record.version}: {len(record.class_names)} classes, "
        f"val top-1 {_pct(record.metrics.val_top1)} (best epoch {result.best_epoch}), "
        f"test top-1 {_pct(record.metrics.test_top1)}, {result.epochs_run} epochs in {result.train_seconds:.1f} s"
    )
    reduced = getattr(result, "reduced_per_step", None)  # a data-parallel run (DistributedTrainResult)
    if reduced is not None:
        stderr.print(
            f"trained by {nproc} processes over {result.backend}; each step all-reduced {reduced} numbers "
            f"({reduced * 4 / 1024:.0f} KB of γ/β and head gradients)"
        )
    if init_from == "auto":
        chosen = record.train_config.init_from
        stdout.print(
            f"--init-from auto started from task '{chosen}'"
            if chosen
            else "--init-from auto: no stored task of this backbone to start from; started cold"
        )


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """List tasks (latest versions)."""
    from ssf_tasks.catalog import list_tasks

    records = list_tasks(engine_of(ctx))
    if as_json:
        for r in records:
            typer.echo(r.model_dump_json())
        return
    if not records:
        typer.echo("no tasks registered")
        return
    rows = [("NAME", "VERSION", "BACKBONE", "CLASSES", "VAL TOP-1", "TEST TOP-1", "CREATED")]
    rows += [
        (
            r.name,
            str(r.version),
            r.backbone,
            str(len(r.class_names)),
            _pct(r.metrics.val_top1),
            _pct(r.metrics.test_top1),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
        for r in records
    ]
    print_table(rows)


@app.command("show")
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Version (default: latest).")] = None,
) -> None:
    """Show one task version as JSON (classes, training config, metrics) and its versions."""
    from ssf_tasks.catalog import show_task

    record, versions = show_task(engine_of(ctx), name, version)
    typer.echo(record.model_dump_json(indent=2))
    typer.echo(f"versions: {', '.join(map(str, versions))}")


@app.command("rm")
def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Remove only this version.")] = None,
) -> None:
    """Remove a task (all versions) or one version of it."""
    from ssf_tasks.catalog import remove_task

    removed = remove_task(engine_of(ctx), name, version)
    what = f"version {version} of task" if version is not None else f"{removed} version(s) of task"
    stdout.print(f"removed {what} '{name}'")


@app.command("eval")
def eval_(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    data: Annotated[Path, typer.Option("--data", help="Dataset folder or path,label CSV.")],
    split: Annotated[
        Literal["train", "val", "test"] | None,
        typer.Option("--split", help="Split to evaluate (default: test, else val, else train)."),
    ] = None,
    version: Annotated[int | None, typer.Option("--version", min=1)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    device: Annotated[Literal["auto", "cpu", "cuda"], typer.Option("--device")] = "auto",
) -> None:
    """Top-1 accuracy of a stored task on a dataset, with the transform it was trained with."""
    from ssf_tasks.engine import evaluate_task

    top1, used, count = evaluate_task(
        engine_of(ctx), name, data, version=version, split=split, batch_size=batch_size, device=device
    )
    stdout.print(f"task '{name}' on {data} ({used}, {count} images): top-1 {_pct(top1)}")


@app.command("export-file")
def export_file(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    out: Annotated[Path, typer.Option("--out", help="Task file to write (safetensors with a JSON record).")],
    version: Annotated[int | None, typer.Option("--version", min=1)] = None,
) -> None:
    """Write a task to one portable file, to import into another registry."""
    from ssf_tasks.taskfiles import export_task_file

    path = export_task_file(engine_of(ctx), name, out, version=version)
    stdout.print(f"wrote task '{name}' to {path}")


@app.command("import-file")
def import_file(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A file written by 'task export-file'.")],
    new_version: Annotated[
        bool, typer.Option("--new-version", help="Add as a new version if the task exists.")
    ] = False,
) -> None:
    """Add a task file to this registry; a backbone with the same weights must be registered here."""
    from ssf_tasks.taskfiles import import_task_file

    record = import_task_file(engine_of(ctx), file, new_version=new_version)
    stdout.print(f"imported task '{record.name}' version {record.version} onto backbone '{record.backbone}'")


@app.command("plot")
def plot(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Task name.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write (its folder must exist).")],
    version: Annotated[int | None, typer.Option("--version", min=1, help="Version (default: latest).")] = None,
) -> None:
    """Plot a task's γ/β per site, the backbone's weights before and after folding, and its stored metrics."""
    from ssf_tasks.plot import plot_task

    path = plot_task(engine_of(ctx), name, out, version=version)
    stdout.print(f"wrote the plot of task '{name}' to {path}")
