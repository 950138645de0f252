"""ssf-tasks: one frozen timm backbone serving many tasks through SSF scale/shift parameters."""

from . import errors
from .errors import *  # noqa: F403 (every error class is public API; errors.__all__ lists them)
from .fold import fold_error, fold_task
from .graphed import GraphedForward
from .model import MultiTaskSSF
from .sites import find_sites
from .ssf import SSFLayer

__version__ = "0.1.0"

__all__ = ["GraphedForward", "MultiTaskSSF", "SSFLayer", "find_sites", "fold_task", "fold_error", *errors.__all__]
