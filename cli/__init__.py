"""The ``ssf-tasks`` command line (shipped as the import package ``ssf_tasks_cli``)."""

__all__: list[str] = []
