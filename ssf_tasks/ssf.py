"""The SSF wrapper layer: a frozen op followed by a per-task, per-channel scale and shift.

Each ``SSFLayer`` keeps the original module as ``base_layer`` and holds one table row per task
(``ssf_scale`` / ``ssf_shift``: ``[num_tasks, channels]``). Which row a sample uses is read from a
``TaskRouting`` object shared by every site of one model, so a mixed batch is served by gathering rows,
with no loop over tasks. A layer whose op has no bias gets a scale only: its shift could not be folded
into timm's own parameter keys (and a norm right after it has a shift of its own).
"""

from __future__ import annotations

import torch
from timm import layers as timm_layers
from torch import nn
from torch.nn import functional as F

from .errors import BatchMismatchError, SSFTasksError
from .fused_mlp import gelu_backward_sums
from .fused_qkv import qkv_backward
from .kernel_support import linear_site_gradients
from .sites import SiteRule

__all__ = ["SSFLayer", "TaskRouting", "FAST_PATH_AUTO", "patchify_linear"]

# ``SSFLayer.fast_path`` values: None means "on CUDA, when safe"; True/False force it (tests use True on CPU).
FAST_PATH_AUTO = None


class TaskRouting:
    """The task of every sample in the batch being run, shared by all sites of one model.

    ``index`` is an ``int`` when the whole batch belongs to one task (rows broadcast, no gather), a
    ``LongTensor [B]`` for a mixed batch, and ``None`` outside ``MultiTaskSSF.forward``.
    """

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: int | torch.Tensor | None = None

    def mixed_inference(self, x: torch.Tensor) -> bool:
        """A mixed batch (one task index per sample of ``x``) run without autograd: where the mixed-batch kernels
        (``mixed_attention``, ``mixed_gelu``) may take over."""
        index = self.index
        return isinstance(index, torch.Tensor) and index.shape[0] == x.shape[0] and not torch.is_grad_enabled()


class SSFLayer(nn.Module):
    """``y = γ[task] ⊙ base_layer(x) + β[task]`` along the layer's channel axis.

    Args:
        base_layer: the frozen op (Linear, Conv, a norm, or a timm fused norm+activation).
        rule: the site rule for this op (channel axis, and the norm half of a fused layer).
        routing: the model's shared per-sample task routing.
    """

    def __init__(self, base_layer: nn.Module, rule: SiteRule, routing: TaskRouting) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.channel_axis = rule.channel_axis
        self._norm_forward = rule.norm_forward
        self.routing = routing
        self.fast_path: bool | None = FAST_PATH_AUTO
        # Fused path: keep the op's input rather than its output for backward. Worth it where the input is
        # kept anyway by the op before (attention keeps its output, the input of ``proj``) and the output is not.
        self.keep_input = False
        self._fast_kind = _fast_kind(base_layer, rule)
        weight = base_layer.weight
        self.channels = int(weight.shape[0])
        factory = {"dtype": weight.dtype, "device": weight.device}
        self.ssf_scale = nn.Parameter(torch.ones(0, self.channels, **factory))
        if getattr(base_layer, "bias", None) is not None:
            self.ssf_shift: nn.Parameter | None = nn.Parameter(torch.zeros(0, self.channels, **factory))
        else:
            self.register_parameter("ssf_shift", None)

    def extra_repr(self) -> str:
        shift = "scale+shift" if self.ssf_shift is not None else "scale only"
        return f"channels={self.channels}, channel_axis={self.channel_axis}, {shift}, tasks={self.ssf_scale.shape[0]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.uses_fast_path(x):
            return self._fast_forward(x, self.routing.index)
        if self._norm_forward is None:
            if self._fast_kind == "conv2d" and x.is_cuda:  # cuDNN is slow at patchify convs: one GEMM instead
                return self._scale_shift(patchify_linear(x, self.base_layer.weight, self.base_layer.bias))
            return self._scale_shift(self.base_layer(x))
        # Fused norm+act: SSF sits between the norm and the activation, where it can still be folded.
        y = self._scale_shift(self._norm_forward(self.base_layer, x))
        return self.base_layer.act(self.base_layer.drop(y))

    def _scale_shift(self, y: torch.Tensor) -> torch.Tensor:
        index = self.routing.index
        if index is None:
            raise SSFTasksError("an SSF site ran without a task: call MultiTaskSSF(images, tasks), not the backbone")
        scale, shift = self.task_rows(index)
        shape = [1] * y.ndim
        shape[self.channel_axis] = self.channels
        if isinstance(index, torch.Tensor):
            # Rows follow the batch when a model folds it (Swin: B images -> B x windows rows, image-major).
            rows, batch = y.shape[0], index.shape[0]
            if rows != batch:
                if rows % batch:
                    raise BatchMismatchError(f"a site saw {rows} rows for a batch of {batch} images")
                scale = scale.repeat_interleave(rows // batch, dim=0)
                shift = shift.repeat_interleave(rows // batch, dim=0) if shift is not None else None
            shape[0] = rows
        scale = scale.to(y.dtype).view(shape)
        if shift is None:
            return y * scale
        return torch.addcmul(shift.to(y.dtype).view(shape), y, scale)

    def task_rows(self, index: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(γ, β)`` rows of task ``index`` (one row for an ``int``, one per sample for a tensor); β is None for a
        scale-only site."""
        if isinstance(index, int) and index in (0, -1) and self.ssf_scale.shape[0] == 1:
            # The table of one task, as training holds it (``isolate_tasks``): a view, whose backward is the
            # gradient itself, where indexing's would copy it into a zeroed table (a kernel per parameter, once
            # the fused path's kernels form the gradients themselves).
            shift = self.ssf_shift.view(self.channels) if self.ssf_shift is not None else None
            return self.ssf_scale.view(self.channels), shift
        return self.ssf_scale[index], self.ssf_shift[index] if self.ssf_shift is not None else None

    # ------------------------------------------------------------------------------------------- fast path
    def uses_fast_path(self, x: torch.Tensor) -> bool:
        """One task for the whole batch, and an op whose SSF can be fused (see ``_fast_forward``)."""
        if self._fast_kind is None or not isinstance(self.routing.index, int):
            return False
        return x.is_cuda if self.fast_path is None else self.fast_path

    def _fast_forward(
        self,
        x: torch.Tensor,
        index: int,
        activation: str | None = None,
        keep: str | None = None,
        heads: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The same function as the eager path, computed without storing anything extra for backward.

        * LayerNorm: γ/β are folded into the norm's affine on the fly (``w·γ``, ``b·γ + β``); the norm's own
          backward then yields their gradients from what it saves anyway.
        * Linear / patchify Conv2d: γ/β are folded into the op's weight and bias on the fly (``_FrozenOpSSF``), so
          forward is the op alone. The frozen op needs no saved input; its output is saved instead, and γ's
          gradient is computed from it (``z = (y - β) / γ``). That output is usually saved by the next op anyway
          (GELU, attention), so it costs no memory, unlike ``x * γ + β``, which keeps its own input. Where the
          input is the one kept anyway (``keep_input``: ``proj`` after attention, outside ViT's fused block chain),
          it is saved instead and ``z`` is recomputed from it. ``keep="nothing"`` saves neither and leaves γ/β's
          gradients to the caller (``proj`` and ``fc2`` in the chain, see ``fused_block``).
        """
        base = self.base_layer
        scale, shift = self.task_rows(index)
        if self._fast_kind == "layer_norm":
            bias = base.bias * scale + shift if shift is not None else None
            return F.layer_norm(x, base.normalized_shape, base.weight * scale, bias, base.eps)
        keep = keep or ("input" if self.keep_input else "output")
        args = (self._fast_kind, keep, _conv_args(base), activation, heads)
        return _FrozenOpSSF.apply(x, base.weight, base.bias, scale, shift, *args)

    def fast_forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(self(x))`` on the fused path of a Linear site (an MLP's ``fc1``, see ``ssf_tasks.fused_mlp``).

        One op, whose backward runs GELU's backward and this site's two column sums in one pass.
        """
        return self._fast_forward(x, self.routing.index, "gelu")

    def fast_forward_heads(self, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, H, N, d]`` split off ``self(x)`` as timm's ``Attention`` splits its ``qkv`` output, on the
        fused path of a Linear site (attention's ``qkv``, see ``ssf_tasks.fused_qkv``).

        One op, whose backward lays dq, dk and dv out as this site's output gradient and takes its two column
        sums in one pass.
        """
        return self._fast_forward(x, self.routing.index, heads=heads)

    def fast_forward_sums_elsewhere(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` on the fused path of a Linear site whose γ/β gradients the caller computes.

        The op saves no activation and its backward gives the input gradient only. Used where the output joins
        the residual stream and the next LayerNorm's backward takes this site's sums too (``fused_block``).
        """
        return self._fast_forward(x, self.routing.index, keep="nothing")


def _fast_kind(base: nn.Module, rule: SiteRule) -> str | None:
    """Which fused path an op may take; None keeps the eager path (other norms, fused norm+act, exotic convs)."""
    if rule.norm_forward is not None:
        return None
    if type(base) is nn.Linear:
        return "linear"
    if type(base) is nn.Conv2d and _is_patchify(base):
        return "conv2d"
    layer_norm_types = (nn.LayerNorm, getattr(timm_layers, "LayerNorm", nn.LayerNorm))
    if type(base) in layer_norm_types and rule.channel_axis == -1 and base.bias is not None:
        return "layer_norm"
    return None


def _is_patchify(conv: nn.Conv2d) -> bool:
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


def _conv_args(base: nn.Module) -> tuple | None:
    if isinstance(base, nn.Conv2d):
        return (base.stride, base.padding, base.dilation, base.groups)
    return None


class _FrozenOpSSF(torch.autograd.Function):
    """``y = γ ⊙ op(x) + β`` for a frozen Linear/Conv2d as one op with ``γ`` folded into its weight.

    Forward runs the op once with ``W' = γ ⊙ W`` and ``b' = γ ⊙ b + β`` (no elementwise pass). Backward needs
    ``dy`` and one saved tensor: ``dx = op_input_grad(dy, W')``, ``dβ = Σ dy`` and ``dγ = Σ dy ⊙ z`` with the
    pre-SSF output ``z``, which is either recomputed from the saved input (``z = op(x)``, one more GEMM) or
    read off the saved output (``z = (y - β) / γ``, so ``dγ = (Σ dy ⊙ y - β ⊙ Σ dy) / γ``: two column sums).
    With ``activation="gelu"`` the op returns ``gelu(y)`` and its backward starts with GELU's, fused with the
    two sums (``fused_mlp.gelu_backward_sums``); ``y``, which GELU would keep anyway, is the saved tensor. With
    ``heads`` it returns timm's q, k, v split of ``y`` (``[B, N, 3·H·d]``), which attention keeps anyway, and its
    backward lays their gradients out as ``dy`` and takes the sums in the same pass
    (``fused_qkv.qkv_backward``).
    ``keep`` says which tensor is saved: ``"output"``, ``"input"``, or ``"nothing"`` (no γ/β gradients here:
    the caller computes them, see ``fused_block``).
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
    return patchify_linear(x, weight, bias)  # the fused path's convs are patchify convs (``_is_patchify``)


def patchify_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A patchify conv (kernel = stride, no padding, one group) as one GEMM over the image's patches.

    Why: cuDNN runs a patchify conv as a general conv, with layout conversions around it. ViT-B's 16×16 patch
    embedding at batch 64 in bf16 took 519 µs compiled on an H200, the same GEMM 39 µs (BENCHMARKS.md, "Patch
    embedding"); ``torch.backends.cudnn.benchmark`` did not change that. Same values as
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
