"""The HTTP server: one :class:`~ssf_tasks.engine.Predictor` behind FastAPI, with cross-task dynamic batching.

Needs the ``serve`` extra (``pip install 'ssf-tasks[serve]'``): fastapi, uvicorn, prometheus-client.
"""

__all__: list[str] = []
