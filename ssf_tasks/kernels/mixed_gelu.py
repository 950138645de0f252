"""``fc1``'s per-sample SSF and GELU in one pass over a mixed batch (one Triton kernel, CUDA only).

Why: in a compiled mixed-task forward, inductor fuses ``fc1``'s gathered γ/β into the GELU kernel after it, but
it computes every element's table address from the task index (``table[task[row // tokens], column]``) and
Triton cannot vectorise a load whose address comes from another load, which made that kernel clearly slower than
GELU alone (BENCHMARKS.md, ``ssf-tasks bench kernel mixed-gelu``). Here each program takes
a run of channels of a chunk of one sample's tokens: it loads the sample's task and its γ/β run once, as contiguous
vectors, and streams the chunk's rows through them. The chunk matters: with one row per program, loading γ/β
costs as much as the GELU; with 16 rows it is hidden.
"""

from __future__ import annotations

import torch

from .triton_support import device_programs, tl, triton

__all__ = ["mixed_gelu_available", "mixed_ssf_gelu", "mixed_ssf_gelu_reference"]


def mixed_gelu_available(y: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """The kernel runs on CUDA tensors ``[B, N, C]`` of half/bfloat16 (``dtype``, default ``y.dtype``) when Triton
    is installed."""
    return triton is not None and y.is_cuda and y.ndim == 3 and (dtype or y.dtype) in (torch.float16, torch.bfloat16)


def mixed_ssf_gelu_reference(
    y: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor
) -> torch.Tensor:
    """``gelu(γ[task] ⊙ y + β[task])`` (exact, erf form) in fp32 (fp64 for fp64 ``y``), rounded to ``y``'s dtype once
    (the reference)."""
    compute = torch.promote_types(y.dtype, torch.float32)
    scale, shift = scale_table[task_rows].to(compute), shift_table[task_rows].to(compute)
    return torch.nn.functional.gelu(y.to(compute) * scale[:, None, :] + shift[:, None, :]).to(y.dtype)


# The best of a tile sweep at ViT-B's fc1 output, [256, 197, 3072] bf16 (``ssf-tasks bench kernel mixed-gelu``): one
# row of 1024 channels at a time, 16 tokens per program (``_TOKENS`` 0: all of a sample's), before the halving below.
_BLOCK_R, _BLOCK_C, _WARPS, _TOKENS, _STAGES = 1, 1024, 4, 16, 1
# Small batches take fewer tokens per program, down to one tile, until the grid has this many programs per
# streaming multiprocessor: at batch 1 ViT-B's 16-token chunks make 39 programs, too few to fill a GPU.
_MIN_PROGRAMS_PER_SM = 8


def _tokens_per_program(batch: int, tokens: int, column_blocks: int, min_programs: int) -> int:
    """``_TOKENS``, halved (down to ``_BLOCK_R``) while the grid has fewer than ``min_programs`` programs."""
    chunk = min(_TOKENS or tokens, tokens)
    while chunk > _BLOCK_R and batch * -(-tokens // chunk) * column_blocks < min_programs:
        chunk = max(_BLOCK_R, chunk // 2)
    return chunk


if triton is not None:

    @triton.jit
    def _mixed_ssf_gelu_kernel(
        y_ptr,
        out_ptr,
        scale_ptr,
        shift_ptr,
        task_ptr,
        task_stride,
        tokens,
        channels,
        stride_table,
        tokens_per_program,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        EVEN_C: tl.constexpr,
        STAGES: tl.constexpr,
    ):
        # One program per (sample, chunk of its tokens, block of channels): the sample's task and γ/β are loaded
        # once, then the chunk's rows stream through in tiles of BLOCK_R. Channel blocks of a chunk are neighbours
        # in the grid, so the chunk's rows are read in order.
        column_blocks = tl.cdiv(channels, BLOCK_C)
        chunks = tl.cdiv(tokens, tokens_per_program)
        pid = tl.program_id(0)
        columns = (pid % column_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        sample_chunk = pid // column_blocks
        sample = sample_chunk // chunks
        first = (sample_chunk % chunks) * tokens_per_program
        last = tl.minimum(first + tokens_per_program, tokens)
        if EVEN_C:
            column_ok = tl.full((BLOCK_C,), True, tl.int1)
        else:
            column_ok = columns < channels
        task = tl.load(task_ptr + sample * task_stride)
        scale = tl.load(scale_ptr + task * stride_table + columns, mask=column_ok, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + task * stride_table + columns, mask=column_ok, other=0.0).to(tl.float32)
        sample_rows = sample.to(tl.int64) * tokens
        for start in tl.range(first, last, BLOCK_R, num_stages=STAGES):
            token = start + tl.arange(0, BLOCK_R)
            ok = (token < last)[:, None] & column_ok[None, :]
            offsets = (sample_rows + token)[:, None] * channels + columns[None, :]
            z = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
            out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
            tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=ok)

    @torch.library.triton_op("ssf_tasks::mixed_ssf_gelu", mutates_args=())
    def _mixed_ssf_gelu_op(
        y: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor
    ) -> torch.Tensor:
        """The kernel on a contiguous ``[B, N, C]`` ``y`` and contiguous tables; ``task_rows`` may be strided (see
        ``mixed_ssf_gelu``)."""
        batch, tokens, channels = y.shape
        out = torch.empty_like(y)
        column_blocks = triton.cdiv(channels, _BLOCK_C)
        min_programs = device_programs(y.device, _MIN_PROGRAMS_PER_SM)
        tokens_per_program = _tokens_per_program(batch, tokens, column_blocks, min_programs)
        grid = (batch * triton.cdiv(tokens, tokens_per_program) * column_blocks,)
        torch.library.wrap_triton(_mixed_ssf_gelu_kernel)[grid](
            y, out, scale_table, shift_table, task_rows, task_rows.stride(0), tokens, channels, scale_table.stride(0),
            tokens_per_program,
            BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, EVEN_C=channels % _BLOCK_C == 0, STAGES=_STAGES, num_warps=_WARPS,
        )  # fmt: skip
        return out


def mixed_ssf_gelu(
    y: torch.Tensor, scale_table: torch.Tensor, shift_table: torch.Tensor, task_rows: torch.Tensor
) -> torch.Tensor:
    """``gelu(γ[task] ⊙ y + β[task])`` for each sample of a mixed batch (GELU's exact, erf form).

    Args:
        y: ``[B, N, C]``, the Linear's output before SSF (bias included).
        scale_table, shift_table: the site's ``[T, C]`` tables.
        task_rows: LongTensor ``[B]``: each sample's row in the tables.

    Returns:
        ``[B, N, C]`` in ``y``'s dtype. The affine and GELU run in fp32 and round once; the kernel where
        :func:`mixed_gelu_available`, the reference elsewhere.
    """
    if not mixed_gelu_available(y):
        return mixed_ssf_gelu_reference(y, scale_table, shift_table, task_rows)
    return _mixed_ssf_gelu_op(y.contiguous(), scale_table.contiguous(), shift_table.contiguous(), task_rows)
