"""The ``ssf-tasks`` command line (shipped as the import package ``ssf_tasks_cli``)."""

from __future__ import annotations

import signal
import sys

__all__ = ["main"]


def main() -> None:
    """Console-script entry point that also covers Ctrl-C while the app is still being imported.

    Importing the app imports torch and timm, which takes seconds; a Ctrl-C in that window happens before
    ``main.py``'s error boundary exists and would print a long traceback. This module imports nothing heavy,
    so the boundary can start here.
    """
    signal.signal(signal.SIGTERM, _terminated_while_starting)
    try:
        from .main import _CleanErrors, app
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    _CleanErrors.whole_process = True
    app()


def _terminated_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("error: terminated\n")
    raise SystemExit(143)
