"""The ``ssf-tasks`` command line (shipped as the import package ``ssf_tasks_cli``)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point that also covers Ctrl-C while the app is still being imported.

    Importing the app imports torch and timm, which takes seconds; a Ctrl-C in that window happens before
    ``main.py``'s error boundary exists and would print a long traceback. This module imports nothing heavy,
    so the boundary can start here.
    """
    try:
        from .main import app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    app()
