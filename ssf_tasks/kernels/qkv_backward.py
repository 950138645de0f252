"""Training attention's ``qkv`` site: dq, dk, dv laid out as the site's gradient, with its γ/β sums, in one pass.

Why: on the fused training path (``frozen_op.FrozenOpSSF``) a Linear site's γ/β gradients are two column sums,
``Σ dy`` and ``Σ dy ⊙ y``, over every row of its output ``y`` and its gradient ``dy``. For ``qkv``, ``dy`` is
the q, k and v gradients that the attention backward gives, put back side by side in the ``[B, N, 3·H·d]``
layout of timm's split. Even a frozen backbone pays for that copy. Left to torch.compile, the copy and the two
sums took three kernels that read the q/k/v gradients twice more. The kernel here reads each gradient and ``y``
once, writes ``dy`` and keeps the two sums as it goes (timings in BENCHMARKS.md, ``ssf-tasks bench kernel
qkv-backward``). It also forms the site's ``dγ``/``dβ`` from the sums (``triton_support.finished_last``), so no
kernel of torch.compile's follows it.

``SSFLayer.fast_forward_heads`` runs ``qkv``, its SSF and timm's q/k/v split as one op whose backward takes
this kernel; the ViT attention adapter calls it on the fused path (one task per batch, on CUDA).
"""

from __future__ import annotations

import torch

from .triton_support import device_programs, finished_last, linear_site_gradients, row_chunks, tl, triton

__all__ = ["qkv_backward"]


def qkv_backward(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, grads)`` for timm's split of a ``qkv`` output ``y`` ``[B, N, 3·H·d]`` into q, k, v ``[B, H, N, d]``,
    where ``y`` came out of a Linear with the site's ``γ`` (``scale``) and ``β`` (``shift``, None for a
    scale-only site) folded in.

    ``dq``, ``dk``, ``dv`` are the gradients of q, k and v (any strides). ``dy`` is them laid out as ``y`` is, in
    ``y``'s dtype; ``grads`` is ``[2, 3·H·d]`` in fp32 (fp64 for fp64 input): ``dγ = (Σ dy ⊙ y - β ⊙ Σ dy) / γ``
    and ``dβ = Σ dy``, with the sums over every sample and token (``_qkv_backward_sums_torch``), taken over
    ``dy`` as returned (rounded to its dtype), so they are the gradients of exactly the ``dy`` that flows on.
    """
    if y.ndim != 3 or dq.ndim != 4:
        raise ValueError(f"qkv_backward needs a [B, N, 3·H·d] output and [B, H, N, d] gradients, got {y.shape}")
    batch, tokens, width = y.shape
    heads, head_dim = dq.shape[1], dq.shape[3]
    expected = (batch, heads, tokens, head_dim)
    if any(tuple(g.shape) != expected for g in (dq, dk, dv)) or 3 * heads * head_dim != width:
        raise ValueError(
            f"qkv_backward needs q/k/v gradients of shape {expected} for a qkv output of {tuple(y.shape)}, got "
            f"{[tuple(g.shape) for g in (dq, dk, dv)]}"
        )
    if scale.shape != (width,) or (shift is not None and shift.shape != (width,)):
        raise ValueError(f"qkv_backward needs γ and β of shape ({width},), got {tuple(scale.shape)}")
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if (
        triton is not None
        and y.is_cuda
        and all(t.dtype in kernel_dtypes for t in (dq, dk, dv, y))
        and y.numel() > 0
        and y.is_contiguous()
    ):
        shift = shift.float().contiguous() if shift is not None else None
        return _qkv_backward_op(dq, dk, dv, y, scale.float().contiguous(), shift)
    dy, sums = _qkv_backward_sums_torch(dq, dk, dv, y)
    return dy, _gradients_from_sums(sums, scale, shift)


def _qkv_backward_sums_torch(dq, dk, dv, y) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dy, [Σ dy, Σ dy ⊙ y])``."""
    # [3, B, H, N, d] -> [B, N, 3, H, d]: the inverse of timm's permute(2, 0, 3, 1, 4)
    dy = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(y.shape).to(y.dtype)
    accumulate = torch.promote_types(dy.dtype, torch.float32)
    rows = dy.reshape(-1, dy.shape[-1]).to(accumulate)
    return dy, torch.stack([rows.sum(0), (rows * y.reshape(rows.shape).to(accumulate)).sum(0)])


def _gradients_from_sums(sums, scale, shift) -> torch.Tensor:
    """``[dγ, dβ]`` from ``[Σ dy, Σ dy ⊙ y]`` (as the kernel forms them)."""
    return torch.stack(linear_site_gradients(*sums.unbind(0), scale, shift))


if triton is not None:

    @triton.jit
    def _qkv_part(
        g_ptr,
        g_sample,
        g_head,
        g_token,
        g_within,
        y_ptr,
        dy_ptr,
        sums_ptr,
        part,
        columns,
        column_ok,
        first,
        last,
        tokens,
        width,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One of q/k/v (``part``): copies its gradient's columns into dy for rows [first, last) and adds the two
        # sums of those rows into sums_ptr [2, 3·width].
        column_offsets = (columns // HEAD_DIM).to(tl.int64) * g_head + (columns % HEAD_DIM) * g_within
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc_dy_y = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for start in tl.range(first, last, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            ok = (row < last)[:, None] & column_ok[None, :]
            sample = row // tokens
            row_offsets = sample.to(tl.int64) * g_sample + (row - sample * tokens).to(tl.int64) * g_token
            g = tl.load(g_ptr + row_offsets[:, None] + column_offsets[None, :], mask=ok, other=0.0)
            offsets = row.to(tl.int64)[:, None] * (3 * width) + part * width + columns[None, :]
            y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            dy = g.to(dy_ptr.dtype.element_ty)
            tl.store(dy_ptr + offsets, dy, mask=ok)
            dy = dy.to(tl.float32)
            acc_dy += dy
            acc_dy_y += dy * y
        out = sums_ptr + part * width + columns
        tl.atomic_add(out, tl.sum(acc_dy, 0), mask=column_ok, sem="relaxed")
        tl.atomic_add(out + 3 * width, tl.sum(acc_dy_y, 0), mask=column_ok, sem="relaxed")

    @triton.jit
    def _qkv_backward_kernel(
        dq_ptr,
        dk_ptr,
        dv_ptr,
        y_ptr,
        scale_ptr,
        shift_ptr,
        dy_ptr,
        sums_ptr,
        grads_ptr,
        rows,
        tokens,
        width,
        rows_per_chunk,
        chunks,
        q_sample,
        q_head,
        q_token,
        q_within,  # the strides of dq [B, H, N, d], then of dk and dv
        k_sample,
        k_head,
        k_token,
        k_within,
        v_sample,
        v_head,
        v_token,
        v_within,
        HEAD_DIM: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        HAS_SHIFT: tl.constexpr,
    ):
        # One program per (block of a head-row's columns, chunk of rows) does q, then k, then v, adding its sums
        # into sums_ptr [2, 3·width] (zeroed, then a count of finished programs per column block); the program
        # that finishes a column block last forms its gradients.
        columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        column_ok = columns < width
        chunk = tl.program_id(1)
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, rows)
        _qkv_part(
            dq_ptr, q_sample, q_head, q_token, q_within, y_ptr, dy_ptr, sums_ptr, 0,
            columns, column_ok, first, last, tokens, width, HEAD_DIM, BLOCK_R, BLOCK_C,
        )  # fmt: skip
        _qkv_part(
            dk_ptr, k_sample, k_head, k_token, k_within, y_ptr, dy_ptr, sums_ptr, 1,
            columns, column_ok, first, last, tokens, width, HEAD_DIM, BLOCK_R, BLOCK_C,
        )  # fmt: skip
        _qkv_part(
            dv_ptr, v_sample, v_head, v_token, v_within, y_ptr, dy_ptr, sums_ptr, 2,
            columns, column_ok, first, last, tokens, width, HEAD_DIM, BLOCK_R, BLOCK_C,
        )  # fmt: skip
        if finished_last(sums_ptr + 6 * width + tl.program_id(0), chunks):
            for part in tl.static_range(3):
                at = part * width + columns
                sum_dy = tl.load(sums_ptr + at, mask=column_ok, other=0.0, cache_modifier=".cg")
                sum_dy_y = tl.load(sums_ptr + 3 * width + at, mask=column_ok, other=0.0, cache_modifier=".cg")
                if HAS_SHIFT:
                    sum_dy_y -= tl.load(shift_ptr + at, mask=column_ok, other=0.0) * sum_dy
                scale = tl.load(scale_ptr + at, mask=column_ok, other=1.0)
                tl.store(grads_ptr + at, sum_dy_y / scale, mask=column_ok)
                tl.store(grads_ptr + 3 * width + at, sum_dy, mask=column_ok)

    # The best of a tile sweep at ViT-B's shape (``ssf-tasks bench kernel qkv-backward``). Doing q, k and v in one
    # loop with per-row-block sums instead was slower at every tile tried.
    _BLOCK_R, _BLOCK_C, _WARPS, _STAGES = 32, 128, 4, 1
    _PROGRAMS_PER_SM = 4

    # A ``triton_op``: torch.compile launches the kernel from its own generated code (CUDA graphs included).
    @torch.library.triton_op("ssf_tasks::qkv_backward", mutates_args=())
    def _qkv_backward_op(
        dq: torch.Tensor,
        dk: torch.Tensor,
        dv: torch.Tensor,
        y: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The kernel on a contiguous ``y``, gradients of any strides and fp32 ``γ``/``β`` (see ``qkv_backward``)."""
        batch, tokens, width3 = y.shape
        width, rows = width3 // 3, batch * tokens
        column_blocks = triton.cdiv(width, _BLOCK_C)
        chunks, rows_per_chunk = row_chunks(
            rows, _BLOCK_R, device_programs(y.device, _PROGRAMS_PER_SM) // column_blocks
        )
        dy = torch.empty_like(y)
        # the two sums, then a count of finished programs per column block
        sums = torch.zeros(2 * width3 + column_blocks, device=y.device, dtype=torch.float32)
        grads = torch.empty(2, width3, device=y.device, dtype=torch.float32)
        torch.library.wrap_triton(_qkv_backward_kernel)[(column_blocks, chunks)](
            dq, dk, dv, y, scale, scale if shift is None else shift, dy, sums, grads,
            rows, tokens, width, rows_per_chunk, chunks, *dq.stride(), *dk.stride(), *dv.stride(),
            HEAD_DIM=dq.shape[-1], BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, HAS_SHIFT=shift is not None,
            num_warps=_WARPS, num_stages=_STAGES,
        )  # fmt: skip
        return dy, grads
