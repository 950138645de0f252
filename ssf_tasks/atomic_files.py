"""Files written under a temporary name and renamed into place: nobody sees a half-written file, even after Ctrl-C."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SSFTasksError

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically, else it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(handle)
    except OSError as e:
        raise SSFTasksError(f"cannot write {path}: {e.strerror or e}") from e
    temp = Path(temp_name)
    try:
        yield temp
        os.replace(temp, path)
    except OSError as e:
        raise SSFTasksError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        temp.unlink(missing_ok=True)
