"""The frozen op of a Linear or patchify-conv site with its SSF folded in on the fly, as one autograd op.

Why: ``x * γ + β`` after a frozen op keeps its own input for backward. Folding ``γ``/``β`` into the op's weight and
bias (``W' = γ ⊙ W``, ``b' = γ ⊙ b + β``) makes the forward the op alone, and the backward needs one tensor that is
usually kept by the next op anyway. The folding identity itself (``fold_rows``, ``fold_bias``) lives here too, so
the fused path and ``ssf_tasks.fold`` share one formula.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .gelu_backward import gelu_backward_sums
from .qkv_backward import qkv_backward
from .triton_support import linear_site_gradients

__all__ = ["FrozenOpSSF", "conv_args", "fold_bias", "fold_rows", "is_patchify", "patchify_linear"]


def is_patchify(conv: nn.Conv2d) -> bool:
    """A non-overlapping patch embedding (ViT, Swin, ConvNeXt stems).

    The fused path saves the op's output, so it must not be changed in place afterwards; CNN convs are often
    followed by in-place activations (squeeze-excite), while a patchify conv is always followed by a reshape
    or a norm. Other convs keep the eager path.
    """
    return (
        conv.kernel_size == conv.stride
        and min(conv.kernel_size) > 1
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.padding in ((0, 0), 0)
        and conv.dilation in ((1, 1), 1)
    )


def conv_args(base: nn.Module) -> tuple | None:
    if isinstance(base, nn.Conv2d):
        return (base.stride, base.padding, base.dilation, base.groups)
    return None


class FrozenOpSSF(torch.autograd.Function):
    """``y = γ ⊙ op(x) + β`` for a frozen Linear/Conv2d as one op with ``γ`` folded into its weight.

    Forward runs the op once with ``W' = γ ⊙ W`` and ``b' = γ ⊙ b + β`` (no elementwise pass). Backward needs
    ``dy`` and one saved tensor: ``dx = op_input_grad(dy, W')``, ``dβ = Σ dy`` and ``dγ = Σ dy ⊙ z`` with the
    pre-SSF output ``z``, which is either recomputed from the saved input (``z = op(x)``, one more GEMM) or
    read off the saved output (``z = (y - β) / γ``, so ``dγ = (Σ dy ⊙ y - β ⊙ Σ dy) / γ``: two column sums).
    With ``activation="gelu"`` the op returns ``gelu(y)`` and its backward starts with GELU's, fused with the
    two sums (``gelu_backward.gelu_backward_sums``); ``y``, which GELU would keep anyway, is the saved tensor. With
    ``heads`` it returns timm's q, k, v split of ``y`` (``[B, N, 3·H·d]``), which attention keeps anyway, and its
    backward lays their gradients out as ``dy`` and takes the sums in the same pass
    (``qkv_backward.qkv_backward``).
    ``keep`` says which tensor is saved: ``"output"``, ``"input"``, or ``"nothing"`` (no γ/β gradients here:
    the caller computes them, see ``residual_norm``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, op, keep, conv_args, activation, heads):
        if keep not in ("output", "input", "nothing"):
            raise ValueError(f"keep must be 'output', 'input' or 'nothing', not {keep!r}")
        if keep != "output" and (activation is not None or heads is not None):
            raise ValueError("a fused activation or head split needs the op's output saved")
        folded_bias = fold_bias(bias, scale, shift) if bias is not None else None
        y = _run_op(op, x, fold_rows(weight, scale), folded_bias)
        ctx.op, ctx.keep, ctx.activation, ctx.heads = op, keep, activation, heads
        ctx.conv_args, ctx.x_shape = conv_args, x.shape
        ctx.has_shift, ctx.has_bias = shift is not None, bias is not None
        # The folded weight is recomputed in backward: saving it would keep a copy of every frozen weight.
        missing = scale  # save_for_backward takes tensors only
        ctx.save_for_backward(
            {"output": y, "input": x, "nothing": missing}[keep],
            weight,
            bias if bias is not None else missing,
            scale,
            shift if shift is not None else missing,
        )
        if heads is not None:
            batch, tokens, width = y.shape
            return y.view(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.gelu(y) if activation == "gelu" else y

    @staticmethod
    def backward(ctx, *grads):
        kept, weight, bias, scale, shift = ctx.saved_tensors
        dy = grads[0]
        if ctx.keep == "nothing":
            grad_scale = sum_dy = None
        elif ctx.keep == "input":
            z_bias = bias.to(kept.dtype) if ctx.has_bias else None
            z = _run_op(ctx.op, kept, weight.to(kept.dtype), z_bias)
            sum_dy, grad_scale = _grad_sums(ctx.op, dy, z)
        elif ctx.heads is not None:  # autograd gives zeros for a q, k or v that was not used
            dy, (grad_scale, sum_dy) = qkv_backward(*grads, kept, scale, shift if ctx.has_shift else None)
        else:
            if ctx.activation == "gelu":
                dy, sum_dy, sum_dy_y = gelu_backward_sums(dy, kept)
            else:
                sum_dy, sum_dy_y = _grad_sums(ctx.op, dy, kept)
            shift_wide = shift.float() if ctx.has_shift else None
            grad_scale, sum_dy = linear_site_gradients(sum_dy, sum_dy_y, scale.float(), shift_wide)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = fold_rows(weight, scale).to(dy.dtype)
            if ctx.op == "linear":
                grad_x = dy @ w
            else:
                stride, padding, dilation, groups = ctx.conv_args
                grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, dy, stride, padding, dilation, groups)
        grad_shift = sum_dy.to(scale.dtype) if ctx.has_shift and sum_dy is not None else None
        grad_scale = grad_scale.to(scale.dtype) if grad_scale is not None else None
        return grad_x, None, None, grad_scale, grad_shift, None, None, None, None, None


def _grad_sums(op: str, dy: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σ dy, Σ dy ⊙ other)`` per output channel, in fp32."""
    dims = [d for d in range(dy.ndim) if d != (dy.ndim - 1 if op == "linear" else 1)]
    return dy.sum(dims, dtype=torch.float32), (dy * other).sum(dims, dtype=torch.float32)


def _run_op(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if op == "linear":
        return F.linear(x, weight, bias)
    return patchify_linear(x, weight, bias)  # the fused path's convs are patchify convs (``is_patchify``)


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A patchify conv (kernel = stride, no padding, one group) as one GEMM over the image's patches.

    Why: cuDNN runs a patchify conv as a general conv, with layout conversions around it, several times slower than
    the same GEMM (``ssf-tasks bench kernel patch-embed``); ``torch.backends.cudnn.benchmark`` did not change that.
    Same values as
    ``F.conv2d(x, weight, bias, stride=kernel)`` (rows and columns past the last whole patch are dropped, as the
    conv drops them); the result is ``[B, O, H', W']`` with channels-last strides, so the
    ``flatten(2).transpose(1, 2)`` of a ViT is a view.
    """
    kh, kw = weight.shape[-2:]
    if x.ndim != 4 or x.shape[-2] < kh or x.shape[-1] < kw:  # unbatched, or smaller than one patch: as the conv does
        return F.conv2d(x, weight, bias, stride=(kh, kw))
    batch, channels, height, width = x.shape
    rows, columns = height // kh, width // kw
    x = x[:, :, : rows * kh, : columns * kw]
    patches = x.reshape(batch, channels, rows, kh, columns, kw).permute(0, 2, 4, 1, 3, 5)
    y = F.linear(patches.reshape(batch, rows, columns, channels * kh * kw), weight.reshape(weight.shape[0], -1), bias)
    return y.permute(0, 3, 1, 2)


def fold_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``γ ⊙ W`` along the output channels (rows of a Linear weight, filters of a conv), in the weight's dtype.

    The folding identity is kept in one place: the fused path applies it on the fly, ``fold_task`` once in fp64.
    """
    return weight * scale.to(weight.dtype).view(-1, *([1] * (weight.ndim - 1)))


def fold_bias(bias: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """``γ ⊙ b + β`` (``γ ⊙ b`` for a scale-only site), in the bias's dtype."""
    return bias * scale.to(bias.dtype) + (shift.to(bias.dtype) if shift is not None else 0.0)
