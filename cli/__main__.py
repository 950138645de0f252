"""``python -m ssf_tasks_cli``: the same as the ``ssf-tasks`` command."""

from . import main

if __name__ == "__main__":  # not when a worker process of the decoder imports it
    main()
