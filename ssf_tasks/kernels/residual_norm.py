"""A residual add and a LayerNorm site as one op whose backward also takes the γ/β gradients of the Linear before it.

Why: on the fused training path (``frozen_op.FrozenOpSSF``) the gradients of a Linear site are two column sums over
every row of its output ``y`` and of ``dy``. For ``proj`` and ``fc2`` of a ViT block, ``dy`` is the residual
stream's gradient, which the next LayerNorm's backward writes; left to torch.compile the sums are separate passes
that read ``dy`` again, plus a GEMM that recomputes ``proj``'s output, and each LayerNorm site's own sums end in an
eager reduction of their partials. Here one op does the residual add and the LayerNorm with its SSF folded in
(``x_out = x_in + y``, ``h = LN(x_out) ⊙ w' + b'``), and its backward is one pass (a Triton kernel on CUDA) that
writes the residual gradient and keeps the column sums that give the LayerNorm site's γ/β gradients and the Linear
site's, and forms those gradients itself (``triton_support.finished_last``). The Linear's output need not be kept:
it is ``x_out - x_in``, two residual-stream tensors that the LayerNorms keep anyway. Nor need ``x_in`` be read but
by a chain's first op: the op before gives ``Σ dx ⊙ x_in`` from its own pass (see ``ResidualNormSSF``), so the
kernel reads as many bytes as a plain LayerNorm backward. The ViT block adapter (``adapters.vit_block``) chains them.
"""

from __future__ import annotations

import torch

from .mixed_attention import linear_output_dtype
from .triton_support import device_programs, finished_last, linear_site_gradients, row_chunks, tl, triton

__all__ = ["ResidualNormSSF", "ResidualSSF", "residual_norm_backward"]


def residual_norm_backward(
    d_h: torch.Tensor,
    d_out: torch.Tensor,
    x_out: torch.Tensor,
    x_in: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    norm_affine: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lin_affine: tuple[torch.Tensor, torch.Tensor],
    next_scale: torch.Tensor | None,
    y_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``x_out = x_in + y; h = LN(x_out) ⊙ (w ⊙ γ_n) + (b ⊙ γ_n + β_n)`` (normalised over the last
    axis), where ``y`` came out of a Linear site with ``γ_l``/``β_l`` folded in (see ``ResidualNormSSF``).

    ``d_h`` and ``d_out`` are the gradients of ``h`` and of ``x_out`` (the residual stream going on); ``mean``
    and ``rstd`` are the norm's statistics per row, as its forward saved them; ``norm_affine`` is
    ``(w, b, γ_n)``, ``lin_affine`` is ``(γ_l, β_l)``. Returns ``dx``, the gradient of ``x_in`` (in ``x_out``'s
    dtype), the same values in ``y_dtype`` as a tensor of their own (the gradient of ``y``, which the Linear
    before takes; never an alias of ``dx``, see ``ResidualSSF.backward``), and the fp32 gradients ``[5, C]``:
    ``dγ_n``, ``dβ_n``, ``dγ_l``, ``dβ_l``, and ``-Σ d_out ⊙ x_out / next_scale``, the share of the next op's
    ``γ_l`` gradient that this op's pass gives (zeros without ``next_scale``). They come from five column sums
    over every row (``_residual_norm_backward_torch``), taken over ``dx`` as returned (rounded to ``x_out``'s
    dtype). Without ``x_in`` (not read at all), ``dγ_l`` lacks ``-Σ dx ⊙ x_in / γ_l``: the op before, whose
    output ``x_in`` is, gives it as its fifth row. On CUDA the sums are added with atomics, so their order, and
    the gradients' last bits, vary from run to run (see ``triton_support.finished_last``).
    """
    rows = x_out.numel() // max(x_out.shape[-1], 1)
    stream = (d_h, d_out, x_out) if x_in is None else (d_h, d_out, x_out, x_in)
    channels = x_out.shape[-1:]
    vectors = (*norm_affine, *lin_affine, *([] if next_scale is None else [next_scale]))
    if (
        not all(t.shape == x_out.shape for t in stream)
        or not all(v.shape == channels for v in vectors)
        or mean.numel() != rows
        or rstd.numel() != rows
    ):
        raise ValueError(
            "residual_norm_backward needs its stream tensors of one shape, a statistic per row and per-channel "
            f"vectors of their last size, got {[tuple(t.shape) for t in (*stream, mean, rstd, *vectors)]}"
        )
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if (
        triton is not None
        and x_out.is_cuda
        and all(t.dtype in kernel_dtypes for t in stream)
        and x_out.numel() > 0
        and x_out.shape[-1] <= _MAX_CHANNELS
    ):
        d_h, d_out, x_out, *rest = [t.contiguous() for t in stream]
        statistics = [t.float().reshape(rows) for t in (mean, rstd)]
        x_in = rest[0] if rest else None
        weight, bias, norm_scale, lin_scale, lin_shift = [v.float().contiguous() for v in vectors[:5]]
        next_scale = next_scale.float().contiguous() if next_scale is not None else None
        return _residual_norm_backward_op(
            d_h, d_out, x_out, x_in, *statistics, weight, bias, norm_scale, lin_scale, lin_shift, next_scale, y_dtype
        )
    weight, bias, norm_scale = norm_affine
    dx, dy, sums = _residual_norm_backward_torch(d_h, d_out, x_out, x_in, mean, rstd, weight * norm_scale, y_dtype)
    return dx, dy, _gradients_from_sums(sums, weight, bias, *lin_affine, next_scale)


def _residual_norm_backward_torch(d_h, d_out, x_out, x_in, mean, rstd, weight, y_dtype):
    """``(dx, dy, sums)`` with the five column sums ``[5, C]``: ``Σ d_h ⊙ x̂``, ``Σ d_h``, ``Σ dx``, ``Σ dx ⊙ y``
    (``Σ dx ⊙ x_out`` without ``x_in``) and ``Σ d_out ⊙ x_out``; ``weight`` is the norm's folded ``w ⊙ γ_n``."""
    accumulate = torch.promote_types(x_out.dtype, torch.float32)
    channels = x_out.shape[-1]
    x = x_out.reshape(-1, channels).to(accumulate)
    rstd = rstd.reshape(-1, 1).to(accumulate)
    x_hat = (x - mean.reshape(-1, 1).to(accumulate)) * rstd
    dh = d_h.reshape(-1, channels).to(accumulate)
    g = dh * weight.to(accumulate)
    d_out = d_out.reshape(-1, channels).to(accumulate)
    dx = d_out + rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    dx = dx.to(x_out.dtype)
    wide = dx.to(accumulate)
    y = x if x_in is None else x - x_in.reshape(-1, channels).to(accumulate)
    sums = torch.stack([(dh * x_hat).sum(0), dh.sum(0), wide.sum(0), (wide * y).sum(0), (d_out * x).sum(0)])
    dx = dx.view(x_out.shape)
    return dx, dx.to(y_dtype, copy=True), sums


def _gradients_from_sums(sums, weight, bias, lin_scale, lin_shift, next_scale):
    """The five gradients of ``residual_norm_backward`` from its five column sums (as the kernel forms them)."""
    s = sums.unbind(0)
    accumulate = sums.dtype
    weight, bias = weight.to(accumulate), bias.to(accumulate)
    share_of_next = -s[4] / next_scale.to(accumulate) if next_scale is not None else torch.zeros_like(s[4])
    lin = linear_site_gradients(s[2], s[3], lin_scale, lin_shift)
    return torch.stack([weight * s[0] + bias * s[1], s[1], *lin, share_of_next])


_MAX_CHANNELS = 4096  # one row of channels is held in registers by the kernel

if triton is not None:

    @triton.jit
    def _residual_norm_backward_kernel(
        d_h_ptr,
        d_out_ptr,
        x_out_ptr,
        x_in_ptr,
        mean_ptr,
        rstd_ptr,
        weight_ptr,
        bias_ptr,
        norm_scale_ptr,
        lin_scale_ptr,
        lin_shift_ptr,
        next_scale_ptr,
        dx_ptr,
        dy_ptr,
        sums_ptr,
        grads_ptr,
        rows,
        channels,
        rows_per_chunk,
        chunks,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
        HAS_X_IN: tl.constexpr,
        HAS_NEXT: tl.constexpr,
    ):
        # One program per chunk of rows, BLOCK_R whole rows at a time: writes dx and dy (dx in y's dtype) and adds
        # its five column sums into sums_ptr [5, C] (zeroed, then a count of finished programs); the program that
        # finishes last forms the gradients from the sums. Without x_in, y stands for x_out (see the op).
        chunk = tl.program_id(0)
        columns = tl.arange(0, BLOCK_C)
        column_ok = columns < channels
        weight = tl.load(weight_ptr + columns, mask=column_ok, other=0.0)
        folded = weight * tl.load(norm_scale_ptr + columns, mask=column_ok, other=0.0)
        acc_dh_xhat = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_dh = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_dx = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_dx_y = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_dout_x = tl.zeros((BLOCK_C,), dtype=tl.float32)
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, rows)
        for start in tl.range(first, last, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            row_ok = row < last
            ok = row_ok[:, None] & column_ok[None, :]
            offsets = row.to(tl.int64)[:, None] * channels + columns[None, :]
            mean = tl.load(mean_ptr + row, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=row_ok, other=0.0)
            x = tl.load(x_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            x_hat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
            dh = tl.load(d_h_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            g = dh * folded[None, :]
            mean_g = tl.sum(g, 1) / channels
            mean_g_xhat = tl.sum(g * x_hat, 1) / channels
            d_out = tl.load(d_out_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            dx = d_out + rstd[:, None] * (g - mean_g[:, None] - x_hat * mean_g_xhat[:, None])
            dx = dx.to(dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + offsets, dx, mask=ok)
            tl.store(dy_ptr + offsets, dx.to(dy_ptr.dtype.element_ty), mask=ok)
            dx = dx.to(tl.float32)  # the sums are those of dx as stored
            if HAS_X_IN:
                y = x - tl.load(x_in_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            else:
                y = x
            acc_dh_xhat += tl.sum(dh * x_hat, 0)
            acc_dh += tl.sum(dh, 0)
            acc_dx += tl.sum(dx, 0)
            acc_dx_y += tl.sum(dx * y, 0)
            acc_dout_x += tl.sum(d_out * x, 0)
        tl.atomic_add(sums_ptr + columns, acc_dh_xhat, mask=column_ok, sem="relaxed")
        tl.atomic_add(sums_ptr + channels + columns, acc_dh, mask=column_ok, sem="relaxed")
        tl.atomic_add(sums_ptr + 2 * channels + columns, acc_dx, mask=column_ok, sem="relaxed")
        tl.atomic_add(sums_ptr + 3 * channels + columns, acc_dx_y, mask=column_ok, sem="relaxed")
        tl.atomic_add(sums_ptr + 4 * channels + columns, acc_dout_x, mask=column_ok, sem="relaxed")
        if finished_last(sums_ptr + 5 * channels, chunks):
            s0 = tl.load(sums_ptr + columns, mask=column_ok, other=0.0, cache_modifier=".cg")
            s1 = tl.load(sums_ptr + channels + columns, mask=column_ok, other=0.0, cache_modifier=".cg")
            s2 = tl.load(sums_ptr + 2 * channels + columns, mask=column_ok, other=0.0, cache_modifier=".cg")
            s3 = tl.load(sums_ptr + 3 * channels + columns, mask=column_ok, other=0.0, cache_modifier=".cg")
            s4 = tl.load(sums_ptr + 4 * channels + columns, mask=column_ok, other=0.0, cache_modifier=".cg")
            bias = tl.load(bias_ptr + columns, mask=column_ok, other=0.0)
            lin_scale = tl.load(lin_scale_ptr + columns, mask=column_ok, other=1.0)
            lin_shift = tl.load(lin_shift_ptr + columns, mask=column_ok, other=0.0)
            out = grads_ptr + columns
            tl.store(out, weight * s0 + bias * s1, mask=column_ok)
            tl.store(out + channels, s1, mask=column_ok)
            tl.store(out + 2 * channels, (s3 - lin_shift * s2) / lin_scale, mask=column_ok)
            tl.store(out + 3 * channels, s2, mask=column_ok)
            if HAS_NEXT:
                next_scale = tl.load(next_scale_ptr + columns, mask=column_ok, other=1.0)
                tl.store(out + 4 * channels, -s4 / next_scale, mask=column_ok)
            else:
                tl.store(out + 4 * channels, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=column_ok)

    # The best of a tile sweep at ViT-B's shape, [64·197, 768] (``ssf-tasks bench kernel residual-norm``).
    _BLOCK_R, _WARPS, _STAGES = 4, 4, 1
    _PROGRAMS_PER_SM = 2

    # A ``triton_op``: torch.compile launches the kernel from its own generated code (CUDA graphs included).
    @torch.library.triton_op("ssf_tasks::residual_norm_backward", mutates_args=())
    def _residual_norm_backward_op(
        d_h: torch.Tensor,
        d_out: torch.Tensor,
        x_out: torch.Tensor,
        x_in: torch.Tensor | None,
        mean: torch.Tensor,
        rstd: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        norm_scale: torch.Tensor,
        lin_scale: torch.Tensor,
        lin_shift: torch.Tensor,
        next_scale: torch.Tensor | None,
        y_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel on contiguous tensors of one shape and fp32 statistics and vectors (see
        ``residual_norm_backward``)."""
        channels = x_out.shape[-1]
        rows = x_out.numel() // channels
        chunks, rows_per_chunk = row_chunks(rows, _BLOCK_R, device_programs(x_out.device, _PROGRAMS_PER_SM))
        dx = torch.empty_like(x_out)
        dy = torch.empty_like(x_out, dtype=y_dtype)
        sums = torch.zeros(5 * channels + 1, device=x_out.device, dtype=torch.float32)  # then the finished count
        grads = torch.empty(5, channels, device=x_out.device, dtype=torch.float32)
        x_in_or_out = x_out if x_in is None else x_in  # not read without x_in
        next_or_lin = lin_scale if next_scale is None else next_scale  # not read without next_scale
        torch.library.wrap_triton(_residual_norm_backward_kernel)[(chunks,)](
            d_h, d_out, x_out, x_in_or_out, mean, rstd, weight, bias, norm_scale, lin_scale, lin_shift, next_or_lin,
            dx, dy, sums, grads, rows, channels, rows_per_chunk, chunks,
            BLOCK_R=_BLOCK_R, BLOCK_C=triton.next_power_of_2(channels), HAS_X_IN=x_in is not None,
            HAS_NEXT=next_scale is not None, num_warps=_WARPS, num_stages=_STAGES,
        )  # fmt: skip
        return dx, dy, grads


class ResidualNormSSF(torch.autograd.Function):
    """``x_out = x_in + y`` and ``h = LN(x_out) ⊙ (w ⊙ γ_n) + (b ⊙ γ_n + β_n)``, where ``y`` came out of a Linear
    site with ``γ_l``/``β_l`` folded in (``SSFLayer.fast_forward_sums_elsewhere``, which leaves their gradients
    here). Saves ``x_out`` and the norm's statistics: ``z = (y - β_l) / γ_l`` with ``y = x_out - x_in``, so
    ``dγ_l = (Σ dx ⊙ y - β_l ⊙ Σ dx) / γ_l`` and ``dβ_l = Σ dx``; ``dγ_n = w ⊙ Σ d_h ⊙ x̂ + b ⊙ Σ d_h``,
    ``dβ_n = Σ d_h``.

    ``Σ dx ⊙ y = Σ dx ⊙ x_out - Σ dx ⊙ x_in``. Where ``x_in`` is the output of the op before in the chain
    (``read_x_in=False``), this op takes the first term only and does not read ``x_in`` at all; the op before
    gives the second as ``Σ d_out ⊙ x_out`` over its own output, which it reads anyway, as a gradient of this
    op's ``γ_l`` (its ``next_scale``), which autograd adds up. That saves a read of the stream per op. The price
    is some fp32 precision where the stream is large against ``y``: a difference of two larger sums (with stream
    channels offset by 1000, ``dγ_l``'s worst relative error against fp64 went from 1e-3 to 1.7e-3).
    """

    @staticmethod
    def forward(ctx, x_in, y, lin_scale, lin_shift, weight, bias, norm_scale, norm_shift, eps, read_x_in, next_scale):
        x_out = x_in + y
        w, b = weight * norm_scale, bias * norm_scale + norm_shift
        h, mean, rstd = torch.ops.aten.native_layer_norm(x_out, list(weight.shape), w, b, eps)
        # Only a Linear reads h (qkv or fc1): give it in the dtype that Linear runs in under autocast, so that
        # the cast is not a pass of its own, nor is the cast of h's gradient back to fp32. (Only where the dtype
        # changes: returning ``h.to(h.dtype)``, which is ``h`` itself, gave wrong compiled gradients on the GPU.)
        dtype = linear_output_dtype(x_out)
        if dtype != h.dtype:
            h = h.to(dtype)
        ctx.y_dtype, ctx.x_in_dtype = y.dtype, x_in.dtype
        ctx.read_x_in, ctx.has_next = read_x_in, next_scale is not None
        missing = lin_scale  # save_for_backward takes tensors only
        kept = (x_in if read_x_in else missing, next_scale if next_scale is not None else missing)
        ctx.save_for_backward(x_out, mean, rstd, lin_scale, lin_shift, weight, bias, norm_scale, *kept)
        return x_out, h

    @staticmethod
    def backward(ctx, d_out, d_h):
        x_out, mean, rstd, lin_scale, lin_shift, weight, bias, norm_scale, x_in, next_scale = ctx.saved_tensors
        x_in = x_in if ctx.read_x_in else None
        next_scale = next_scale if ctx.has_next else None
        norm_affine, lin_affine = (weight, bias, norm_scale), (lin_scale, lin_shift)
        dx, dy, grads = residual_norm_backward(
            d_h, d_out, x_out, x_in, mean, rstd, norm_affine, lin_affine, next_scale, ctx.y_dtype
        )
        grad_norm_scale, grad_norm_shift, grad_lin_scale, grad_lin_shift, grad_next = grads.unbind(0)
        dtype = lin_scale.dtype
        return (
            dx.to(ctx.x_in_dtype),
            dy,
            grad_lin_scale.to(dtype),
            grad_lin_shift.to(dtype),
            None,
            None,
            grad_norm_scale.to(dtype),
            grad_norm_shift.to(dtype),
            None,
            None,
            grad_next.to(dtype) if ctx.has_next else None,
        )


class ResidualSSF(torch.autograd.Function):
    """``x_out = x_in + y`` for the last block's ``fc2`` (no LayerNorm follows inside the chain)."""

    @staticmethod
    def forward(ctx, x_in, y, lin_scale, lin_shift):
        x_out = x_in + y
        ctx.y_dtype, ctx.x_in_dtype = y.dtype, x_in.dtype
        ctx.save_for_backward(x_in, x_out, lin_scale, lin_shift)
        return x_out

    @staticmethod
    def backward(ctx, d_out):
        x_in, x_out, lin_scale, lin_shift = ctx.saved_tensors
        d = d_out.reshape(-1, d_out.shape[-1]).float()
        sum_dx = d.sum(0)
        sum_dx_y = (d * (x_out.float() - x_in.float()).reshape(d.shape)).sum(0)
        grad_lin_scale = (sum_dx_y - lin_shift.float() * sum_dx) / lin_scale.float()
        dtype = lin_scale.dtype
        # The two input gradients are distinct tensors even where they have one dtype: the same tensor returned
        # for both let inductor add into it in place for one while the other still read it (wrong gradients on
        # the GPU, found in fp32).
        d_y = d_out.to(ctx.y_dtype, copy=True)
        return d_out.to(ctx.x_in_dtype), d_y, grad_lin_scale.to(dtype), sum_dx.to(dtype)
