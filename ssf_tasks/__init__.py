"""ssf-tasks: one frozen timm backbone serving many tasks through SSF scale/shift parameters.

The public names are imported on first use, so that importing a submodule (``ssf_tasks.errors`` for the command
line's ``--help``) does not import torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors
from .errors import *  # noqa: F403 (every error class is public API; errors.__all__ lists them)

if TYPE_CHECKING:
    from .engine import Predictor
    from .fold import fold_error, fold_task
    from .graphed import GraphedForward
    from .model import MultiTaskSSF
    from .sites import find_sites
    from .ssf import SSFLayer

__version__ = "0.1.0"

_LAZY = {
    "GraphedForward": "graphed",
    "MultiTaskSSF": "model",
    "Predictor": "engine",
    "SSFLayer": "ssf",
    "find_sites": "sites",
    "fold_error": "fold",
    "fold_task": "fold",
}

__all__ = [  # noqa: F822 (resolved lazily by __getattr__)
    "GraphedForward",
    "MultiTaskSSF",
    "Predictor",
    "SSFLayer",
    "find_sites",
    "fold_error",
    "fold_task",
    *errors.__all__,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
