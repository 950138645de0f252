"""``python -m ssf_tasks_cli``: the same as the ``ssf-tasks`` command."""

from . import main

main()
