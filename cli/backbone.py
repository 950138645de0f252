"""``ssf-tasks backbone ...``: register and list backbones."""

from __future__ import annotations

from typing import Annotated

import typer

from .state import engine_of, print_table, stdout

__all__ = ["app"]

app = typer.Typer(help="Register and list backbones (a timm model plus its weights).", no_args_is_help=True)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Name in the registry, e.g. 'mobilenetv2'.")],
    model: Annotated[str, typer.Option("--model", help="timm model name, e.g. 'mobilenetv2_100'.")],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Local weights FILE, 'package:NAME' (an installed weights package) or 'hub:TAG'. "
            "Default: timm's hub weights (needs a network).",
        ),
    ] = None,
) -> None:
    """Register a backbone; its weights are fingerprinted so tasks are never loaded onto other weights."""
    from ssf_tasks.catalog import add_backbone

    record = add_backbone(engine_of(ctx), name, model, weights)
    stdout.print(
        f"added backbone '{record.name}': {record.timm_name}, weights {record.weights_source}, "
        f"{record.num_features} features, fingerprint {record.fingerprint[:12]}"
    )


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON record per line.")] = False,
) -> None:
    """List registered backbones."""
    from ssf_tasks.catalog import list_backbones

    records = list_backbones(engine_of(ctx))
    if as_json:
        for r in records:
            typer.echo(r.model_dump_json())
        return
    if not records:
        typer.echo("no backbones registered")
        return
    rows = [("NAME", "TIMM MODEL", "FEATURES", "FINGERPRINT", "WEIGHTS")]
    rows += [(r.name, r.timm_name, str(r.num_features), r.fingerprint[:12], r.weights_source) for r in records]
    print_table(rows)
