"""The two column sums behind an SSF site's parameter gradients, in one pass (a Triton kernel on CUDA).

Why: for ``y = γ ⊙ z + β`` the gradients are ``dβ = Σ dy`` and ``dγ = Σ dy ⊙ z`` over every row (sample and
token). Written as two ``sum`` calls, torch.compile reads ``dy`` twice, and the profile also shows 49 aten
reduction kernels per step beside inductor's own; at batch 64 on ViT-B these sums took about 3.4 of the 4.3 ms of
GPU time that SSF adds to a training step (BENCHMARKS.md). One kernel that reads ``dy`` and the second tensor
once, and writes per-chunk partial sums, is the least traffic there can be. Partials are then added in a fixed
order, so the result is deterministic.

The fused training path uses it only where ``SSFLayer.fused_sums`` is set: it is checked on the GPU against fp64,
but its end-to-end speed is not measured yet (BENCHMARKS.md says why).
"""

from __future__ import annotations

import torch

__all__ = ["column_sums"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reduction is used
    triton = None
if not hasattr(torch.library, "triton_op"):  # torch < 2.6 cannot hand a Triton kernel to inductor
    triton = None


def column_sums(dy: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ dy, Σ dy ⊙ other)`` over every axis but the last, in fp32: two ``[C]`` vectors.

    Args:
        dy, other: tensors of one shape ``[..., C]`` (channels last, as a Linear's output and its gradient).
    """
    if dy.shape != other.shape:
        raise ValueError(f"column_sums needs tensors of one shape, got {tuple(dy.shape)} and {tuple(other.shape)}")
    if triton is not None and dy.is_cuda and dy.numel() > 0:
        return _column_sums_op(dy, other)
    return _column_sums_torch(dy, other)


def _column_sums_torch(dy: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = dy.reshape(-1, dy.shape[-1]).float()
    return rows.sum(0), (rows * other.reshape(rows.shape).float()).sum(0)


if triton is not None:

    @triton.jit
    def _column_sums_kernel(
        dy_ptr,
        other_ptr,
        partial_dy_ptr,
        partial_prod_ptr,
        rows,
        channels,
        rows_per_chunk,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program per (block of channels, chunk of rows): fp32 sums of its rows, stored as one partial row.
        columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk = tl.program_id(1)
        column_ok = columns < channels
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc_prod = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, rows)
        for start in range(first, last, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            ok = (row < last)[:, None] & column_ok[None, :]
            offsets = row.to(tl.int64)[:, None] * channels + columns[None, :]
            g = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            t = tl.load(other_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            acc_dy += g
            acc_prod += g * t
        out = chunk * channels + columns
        tl.store(partial_dy_ptr + out, tl.sum(acc_dy, 0), mask=column_ok)
        tl.store(partial_prod_ptr + out, tl.sum(acc_prod, 0), mask=column_ok)

    _BLOCK_R, _BLOCK_C, _WARPS = 32, 128, 4
    _PROGRAMS = 512  # about four per streaming multiprocessor of an H100 (132); on smaller cards, more waves

    # A ``triton_op`` rather than an opaque custom op: torch.compile sees the kernel and launches it from its own
    # generated code (no Python on the way, so it also lives in CUDA graphs) and fuses the small sums after it.
    @torch.library.triton_op("ssf_tasks::column_sums", mutates_args=())
    def _column_sums_op(dy: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = dy.shape[-1]
        dy, other = dy.reshape(-1, channels).contiguous(), other.reshape(-1, channels).contiguous()
        rows = dy.shape[0]
        column_blocks = triton.cdiv(channels, _BLOCK_C)
        # Enough chunks of rows to fill the card a few times over; each chunk a whole number of row blocks.
        chunks = max(1, min(triton.cdiv(rows, _BLOCK_R), _PROGRAMS // column_blocks))
        rows_per_chunk = triton.cdiv(triton.cdiv(rows, chunks), _BLOCK_R) * _BLOCK_R
        chunks = triton.cdiv(rows, rows_per_chunk)
        partial_dy = torch.empty(chunks, channels, device=dy.device, dtype=torch.float32)
        partial_prod = torch.empty_like(partial_dy)
        torch.library.wrap_triton(_column_sums_kernel)[(column_blocks, chunks)](
            dy, other, partial_dy, partial_prod, rows, channels, rows_per_chunk,
            BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_WARPS,
        )  # fmt: skip
        return partial_dy.sum(0), partial_prod.sum(0)
