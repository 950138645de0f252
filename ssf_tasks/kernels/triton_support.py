"""Triton where it can serve the kernels (``triton`` and ``tl``, else None for both), and what the kernels share:
their chunks of rows, grid sizes taken from the device, and how the last program to finish forms the gradients.

Why one place: each training kernel (``gelu_backward``, ``qkv_backward``, ``residual_norm``) has a torch version that
runs where Triton is missing (CPU-only installs) or where torch cannot hand a Triton kernel to inductor
(``torch.library.triton_op``, torch 2.6 and later).
"""

from __future__ import annotations

import functools

import torch

__all__ = ["device_programs", "finished_last", "linear_site_gradients", "row_chunks", "tl", "triton"]

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
if not hasattr(torch.library, "triton_op"):
    triton = tl = None


if triton is not None:

    @triton.jit
    def finished_last(counter_ptr, programs):
        """True in the one program that finishes last, of ``programs`` that each add their column sums into a zeroed
        buffer with atomics and then call this; that program may read the totals (at L2: ``cache_modifier=".cg"``)
        and form the gradients, so no kernel of its own adds partial sums up. ``counter_ptr``: an fp32 zero. The
        order of the atomic adds varies from run to run, as in cuDNN's attention backward: so do the sums' last
        bits."""
        tl.debug_barrier()  # every thread of this program has issued its atomic adds
        finished = tl.atomic_add(counter_ptr, 1.0, sem="acq_rel")  # release: this program's adds come before
        return finished == programs - 1

else:
    finished_last = None


def linear_site_gradients(
    sum_dy: torch.Tensor, sum_dy_y: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dγ, dβ)`` of a Linear or conv site with ``γ``/``β`` folded into its op, from ``Σ dy`` and ``Σ dy ⊙ y`` over
    its output ``y``: ``z = (y - β) / γ``, so ``dγ = Σ dy ⊙ z = (Σ dy ⊙ y - β ⊙ Σ dy) / γ`` and ``dβ = Σ dy``
    (``shift`` None: a scale-only site). The kernels form the same in their last program."""
    if shift is not None:
        sum_dy_y = sum_dy_y - shift.to(sum_dy_y.dtype) * sum_dy
    return sum_dy_y / scale.to(sum_dy_y.dtype), sum_dy


def row_chunks(rows: int, block_rows: int, programs: int) -> tuple[int, int]:
    """``(chunks, rows_per_chunk)`` for a kernel whose programs each take a chunk of whole row blocks and keep its
    column sums: at most ``programs`` chunks, enough to fill the card a few times over, none empty."""
    chunks = max(1, min(_cdiv(rows, block_rows), programs))
    rows_per_chunk = _cdiv(_cdiv(rows, chunks), block_rows) * block_rows
    return _cdiv(rows, rows_per_chunk), rows_per_chunk


def device_programs(device: torch.device, per_multiprocessor: int) -> int:
    """``per_multiprocessor`` programs on every streaming multiprocessor of ``device``: a grid that fills the card
    a few times over whatever its size (the kernels' tiles were chosen at that many programs per multiprocessor).
    Off CUDA (Triton's interpreter, in the tests) the device counts as one multiprocessor."""
    device = torch.device(device)
    if device.type != "cuda":
        return per_multiprocessor
    return per_multiprocessor * _multiprocessors(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
