"""Triton for the training kernels, where it can serve them (``triton`` and ``tl``, else None for both), and what
the kernels share: their chunks of rows, and how they finish their column sums into gradients.

Why one place: each training kernel (``fused_mlp``, ``fused_qkv``, ``fused_block``) has a torch version that runs
where Triton is missing (CPU-only installs) or where torch cannot hand a Triton kernel to inductor
(``torch.library.triton_op``, torch 2.6 and later).
"""

from __future__ import annotations

import torch

__all__ = [
    "finished_last",
    "linear_site_gradients",
    "row_chunks",
    "store_linear_site_gradients",
    "tl",
    "triton",
]

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

    @triton.jit
    def store_linear_site_gradients(sums_ptr, scale_ptr, shift_ptr, grads_ptr, at, ok, width, HAS_SHIFT: tl.constexpr):
        """A Linear site's ``[dγ, dβ]`` (``grads_ptr``, rows of ``width``) at columns ``at`` from its totals
        ``[Σ dy, Σ dy ⊙ y]`` (``sums_ptr``, as ``finished_last``'s program reads them): the kernels' version of
        ``linear_site_gradients``."""
        sum_dy = tl.load(sums_ptr + at, mask=ok, other=0.0, cache_modifier=".cg")
        sum_dy_y = tl.load(sums_ptr + width + at, mask=ok, other=0.0, cache_modifier=".cg")
        if HAS_SHIFT:
            sum_dy_y -= tl.load(shift_ptr + at, mask=ok, other=0.0) * sum_dy
        tl.store(grads_ptr + at, sum_dy_y / tl.load(scale_ptr + at, mask=ok, other=1.0), mask=ok)
        tl.store(grads_ptr + width + at, sum_dy, mask=ok)

else:
    finished_last = store_linear_site_gradients = None


def linear_site_gradients(sums: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``[dγ, dβ]`` of a Linear site with ``γ``/``β`` folded in, from ``[Σ dy, Σ dy ⊙ y]`` over its output ``y``:
    ``z = (y - β) / γ``, so ``dγ = Σ dy ⊙ z = (Σ dy ⊙ y - β ⊙ Σ dy) / γ``, and ``dβ = Σ dy``."""
    sum_dy, sum_dy_y = sums.unbind(0)
    if shift is not None:
        sum_dy_y = sum_dy_y - shift.to(sums.dtype) * sum_dy
    return torch.stack([sum_dy_y / scale.to(sums.dtype), sum_dy])


def row_chunks(rows: int, block_rows: int, programs: int) -> tuple[int, int]:
    """``(chunks, rows_per_chunk)`` for a kernel whose programs each take a chunk of whole row blocks and write one
    row of partial sums: at most ``programs`` chunks, enough to fill the card a few times over, none empty."""
    chunks = max(1, min(_cdiv(rows, block_rows), programs))
    rows_per_chunk = _cdiv(_cdiv(rows, chunks), block_rows) * block_rows
    return _cdiv(rows, rows_per_chunk), rows_per_chunk


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
