"""Every error ssf-tasks raises on purpose.

Each one is an ``SSFTasksError`` (so the CLI can turn it into a one-line message) and also the builtin
exception a Python user would expect (``KeyError`` for an unknown task, ``ValueError`` for bad input, ...).
"""

from __future__ import annotations

__all__ = [
    "SSFTasksError",
    "TaskNotFoundError",
    "DuplicateTaskError",
    "BatchMismatchError",
    "NoSitesError",
    "PatternMatchError",
    "StateDictMismatchError",
    "FoldError",
    "BackboneError",
    "WeightsNotFoundError",
    "BackboneMismatchError",
    "DataError",
    "TrainingError",
    "TrainingInterrupted",
    "RegistryError",
    "SchemaVersionError",
    "InvalidNameError",
]


class SSFTasksError(Exception):
    """Base class: an error whose message is meant for the user as it is.

    ``field`` names the argument the message is about (``new_version``, ``top_k``, ...), as the Python API spells
    it; an interface (the CLI's flags, the server's JSON fields) may respell it in the message.
    """

    def __init__(self, *args: object, field: str | None = None) -> None:
        super().__init__(*args)
        self.field = field

    def __str__(self) -> str:
        # KeyError quotes its message; every subclass shows the plain text instead.
        return str(self.args[0]) if self.args else self.__class__.__name__


class TaskNotFoundError(SSFTasksError, KeyError):
    """A task name that is not loaded or registered."""


class DuplicateTaskError(SSFTasksError, ValueError):
    """A task name that already exists."""


class InvalidNameError(SSFTasksError, ValueError):
    """A task or backbone name that does not follow the naming rule."""


class BatchMismatchError(SSFTasksError, ValueError):
    """Per-sample task list that does not match the batch."""


class NoSitesError(SSFTasksError, ValueError):
    """A backbone with no module that can carry SSF parameters."""


class PatternMatchError(SSFTasksError, ValueError):
    """An include/exclude pattern that matches no module."""


class StateDictMismatchError(SSFTasksError, ValueError):
    """A task state dict with missing, unexpected or wrongly shaped entries."""


class FoldError(SSFTasksError, ValueError):
    """A task that cannot be folded (for example non-finite scale or shift)."""


class BackboneError(SSFTasksError, ValueError):
    """A backbone that cannot be created or used."""


class WeightsNotFoundError(BackboneError, FileNotFoundError):
    """Pretrained weights that are not available offline."""


class BackboneMismatchError(BackboneError):
    """A task trained on a different backbone (fingerprint or architecture differs)."""


class DataError(SSFTasksError, ValueError):
    """A dataset, image or manifest that cannot be used."""


class TrainingError(SSFTasksError, RuntimeError):
    """Training that cannot go on (for example a non-finite loss)."""


class TrainingInterrupted(SSFTasksError, KeyboardInterrupt):
    """Training stopped by the user; nothing was stored."""


class RegistryError(SSFTasksError, RuntimeError):
    """The registry cannot be read or written."""


class SchemaVersionError(RegistryError):
    """A registry written by a newer (or unknown) schema version."""
