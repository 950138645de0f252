"""What every command shares: the registry given by the global ``--registry`` option, and the output consoles.

The registry is opened on first use, so ``--help`` and usage errors never create or touch a database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy import Engine

__all__ = ["AppState", "DecodeMode", "DecodeThreads", "engine_of", "print_table", "stderr", "stdout"]

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class AppState:
    """Per-invocation state passed to sub-commands through ``ctx.obj`` (no global state)."""

    registry_url: str | None = None
    _engine: Engine | None = field(default=None, repr=False)

    def engine(self) -> Engine:
        """The registry's engine, opened (and its schema checked) on first use."""
        if self._engine is None:
            from ssf_tasks.registry import default_registry_url, open_registry

            self._engine = open_registry(self.registry_url or default_registry_url())
        return self._engine

    def close(self) -> None:
        """Release the registry's connections (SQLite files stay unlocked for the next process)."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def engine_of(ctx: typer.Context) -> Engine:
    """The registry engine of the running command."""
    state = ctx.find_object(AppState)
    if state is None:  # a sub-app invoked on its own, e.g. in a test
        state = ctx.ensure_object(AppState)
    return state.engine()


def print_table(rows: list[tuple[str, ...]]) -> None:
    """Plain aligned columns (the first row is the header): readable, and easy to parse in scripts."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


DecodeThreads = Annotated[int | None, typer.Option("--threads", min=1, help="Image decoders (default: one per core).")]
"""``--threads`` of the commands that decode images (predict, serve)."""

DecodeMode = Annotated[
    Literal["auto", "threads", "processes"],
    typer.Option("--decode", help="Decode in threads, in worker processes, or auto (processes on 4+ cores)."),
]
"""``--decode`` of the commands that decode images (predict, serve)."""
