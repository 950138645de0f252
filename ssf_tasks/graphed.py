"""A forward pass captured once in a CUDA graph, for low-latency serving of small fixed-size batches.

Why: at batch 1 or 8 a ViT-B forward is about a millisecond of GPU work spread over a few hundred kernels, so
the host cost of launching them (and of ``torch.compile``'s guards) decides the latency. Replaying one CUDA
graph launches everything at once. ``mode="reduce-overhead"`` does the same inside ``torch.compile`` but still
runs the guards and the graph-tree bookkeeping on every call; this wrapper runs neither, for any callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .errors import BatchMismatchError, SSFTasksError

__all__ = ["GraphedForward"]


class GraphedForward:
    """``fn(*inputs)`` for inputs of fixed shapes, replayed from a CUDA graph.

    The inputs are copied into static buffers before each replay, and the returned tensor is a static buffer
    that the next call overwrites (clone it to keep it). ``fn`` may be a ``torch.compile``d module in its
    default mode; it must not synchronise with the host while captured. ``MultiTaskSSF`` skips its task-index
    check then, so pass ``validate`` to check every call's inputs on the host instead::

        graphed = GraphedForward(model, images, tasks, validate=lambda _, t: model.check_task_indices(t))

    The graph reads every weight and table at the address it had at capture. Build a new ``GraphedForward``
    after anything that replaces them: ``add_task``, ``remove_task``, ``load_task`` of a new task,
    ``isolate_tasks``, ``.to()``. (``update_task`` writes in place and is seen by the next replay.)

    Args:
        fn: the forward to capture.
        example_inputs: CUDA tensors with the shapes and dtypes of every later call.
        validate: called with each call's inputs before they are copied; raises on bad input.
        warmup: calls made before capture (compilation and autotuning happen there).
    """

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        *example_inputs: torch.Tensor,
        validate: Callable[..., None] | None = None,
        warmup: int = 3,
    ) -> None:
        if not example_inputs or not all(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs):
            raise SSFTasksError("GraphedForward captures a CUDA graph: every input must be a CUDA tensor")
        self.validate = validate
        if validate is not None:
            validate(*example_inputs)
        self.static_inputs = [x.clone() for x in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.static_inputs):
            raise BatchMismatchError(f"this graph takes {len(self.static_inputs)} inputs, got {len(inputs)}")
        for buffer, value in zip(self.static_inputs, inputs, strict=True):
            if value.shape != buffer.shape or value.dtype != buffer.dtype:
                raise BatchMismatchError(
                    f"this graph was captured for inputs of shape {tuple(buffer.shape)} and dtype {buffer.dtype}, "
                    f"got {tuple(value.shape)} and {value.dtype}"
                )
        if self.validate is not None:
            self.validate(*inputs)
        for buffer, value in zip(self.static_inputs, inputs, strict=True):
            buffer.copy_(value)
        self.graph.replay()
        return self.static_output
