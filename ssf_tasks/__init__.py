"""ssf-tasks: one frozen timm backbone serving many tasks through SSF scale/shift parameters."""

from .errors import (
    BackboneError,
    BackboneMismatchError,
    BatchMismatchError,
    DataError,
    DuplicateTaskError,
    FoldError,
    InvalidNameError,
    NoSitesError,
    PatternMatchError,
    RegistryError,
    SchemaVersionError,
    SSFTasksError,
    StateDictMismatchError,
    TaskNotFoundError,
    TrainingError,
    TrainingInterrupted,
    WeightsNotFoundError,
)
from .fold import fold_error, fold_task
from .model import MultiTaskSSF
from .sites import find_sites
from .ssf import SSFLayer

__version__ = "0.1.0"

__all__ = [
    "MultiTaskSSF",
    "SSFLayer",
    "find_sites",
    "fold_task",
    "fold_error",
    "SSFTasksError",
    "TaskNotFoundError",
    "DuplicateTaskError",
    "InvalidNameError",
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
]
