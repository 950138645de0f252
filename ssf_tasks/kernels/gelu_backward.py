"""GELU's backward and a Linear site's γ/β gradient sums in one pass (Triton on CUDA, torch elsewhere).

Why: on the fused training path (``frozen_op.FrozenOpSSF``) a Linear site's gradients are two column sums,
``Σ dy`` and ``Σ dy ⊙ y``, over every row (sample and token) of the op's output ``y`` and its gradient ``dy``.
For ``fc1`` of a ViT MLP, ``dy`` is GELU's backward, ``dy = dout ⊙ gelu'(y)``. Left to torch.compile, the sums
become a reduction kernel of their own that reads ``dout`` and ``y`` again and recomputes GELU's backward. The
kernel here reads ``dout`` and ``y`` once, writes ``dy`` (which the input gradient needs anyway) and keeps the two
sums as it goes: about the memory traffic of GELU's backward alone (``ssf-tasks bench kernel gelu-backward``).
"""

from __future__ import annotations

import torch

from .triton_support import device_programs, row_chunks, tl, triton

__all__ = ["gelu_backward_sums"]


def gelu_backward_sums(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dy, Σ dy, Σ dy ⊙ y)`` for ``out = gelu(y)`` (exact, erf form), sums over every axis but the last.

    ``dy`` has ``y``'s dtype; the two ``[C]`` sums are fp32 (fp64 for fp64 input) and are taken over ``dy`` as
    returned (rounded to its dtype), so they are the gradients of exactly the ``dy`` that flows on to the op's
    input.
    """
    if dout.shape != y.shape:
        raise ValueError(f"gelu_backward_sums needs tensors of one shape, got {tuple(dout.shape)} and {tuple(y.shape)}")
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if triton is not None and y.is_cuda and y.dtype in kernel_dtypes and y.numel() > 0 and y.is_contiguous():
        return _gelu_backward_sums_op(dout.contiguous(), y)
    return _gelu_backward_sums_torch(dout, y)


def _gelu_backward_sums_torch(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = torch.ops.aten.gelu_backward(dout.to(y.dtype), y)
    accumulate = torch.promote_types(dy.dtype, torch.float32)
    rows = dy.reshape(-1, dy.shape[-1]).to(accumulate)
    return dy, rows.sum(0), (rows * y.reshape(rows.shape).to(accumulate)).sum(0)


if triton is not None:

    @triton.jit
    def _gelu_backward_sums_kernel(
        dout_ptr,
        y_ptr,
        dy_ptr,
        partial_dy_ptr,
        partial_dy_y_ptr,
        rows,
        channels,
        rows_per_chunk,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program per (block of channels, chunk of rows): writes dy for its tile and one row of partial sums.
        columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk = tl.program_id(1)
        column_ok = columns < channels
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc_dy_y = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, rows)
        for start in tl.range(first, last, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            ok = (row < last)[:, None] & column_ok[None, :]
            offsets = row.to(tl.int64)[:, None] * channels + columns[None, :]
            g = tl.load(dout_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
            pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
            dy = (g * (cdf + y * pdf)).to(dy_ptr.dtype.element_ty)
            tl.store(dy_ptr + offsets, dy, mask=ok)
            dy = dy.to(tl.float32)
            acc_dy += dy
            acc_dy_y += dy * y
        out = chunk * channels + columns
        tl.store(partial_dy_ptr + out, tl.sum(acc_dy, 0), mask=column_ok)
        tl.store(partial_dy_y_ptr + out, tl.sum(acc_dy_y, 0), mask=column_ok)

    # The best of a tile sweep at ViT-B's fc1 shape, [64·197, 3072] bf16 (``ssf-tasks bench kernel gelu-backward``).
    _BLOCK_R, _BLOCK_C, _WARPS, _STAGES = 4, 512, 16, 1
    _PROGRAMS_PER_SM = 4

    # A ``triton_op``: torch.compile sees the kernel and launches it from its own generated code (no Python on
    # the way, so it also lives in CUDA graphs), and fuses the small sums of the partials after it.
    @torch.library.triton_op("ssf_tasks::gelu_backward_sums", mutates_args=())
    def _gelu_backward_sums_op(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel on contiguous ``dout`` and ``y`` of one shape, channels last (see ``gelu_backward_sums``)."""
        channels = y.shape[-1]
        rows = y.numel() // channels
        column_blocks = triton.cdiv(channels, _BLOCK_C)
        chunks, rows_per_chunk = row_chunks(
            rows, _BLOCK_R, device_programs(y.device, _PROGRAMS_PER_SM) // column_blocks
        )
        dy = torch.empty_like(y)
        partial_dy = torch.empty(chunks, channels, device=y.device, dtype=torch.float32)
        partial_dy_y = torch.empty_like(partial_dy)
        torch.library.wrap_triton(_gelu_backward_sums_kernel)[(column_blocks, chunks)](
            dout, y, dy, partial_dy, partial_dy_y, rows, channels, rows_per_chunk,
            BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_WARPS, num_stages=_STAGES,
        )  # fmt: skip
        return dy, partial_dy.sum(0), partial_dy_y.sum(0)
