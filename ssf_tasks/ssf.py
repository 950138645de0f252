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
from .kernels.frozen_op import FrozenOpSSF, conv_args, is_patchify, patchify_linear
from .sites import SiteRule

__all__ = ["SSFLayer", "TaskRouting", "FAST_PATH_AUTO"]

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
        (``kernels.mixed_attention``, ``kernels.mixed_gelu``) may take over."""
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
        * Linear / patchify Conv2d: γ/β are folded into the op's weight and bias on the fly
          (``kernels.frozen_op.FrozenOpSSF``), so forward is the op alone. The frozen op needs no saved input;
          its output is saved instead, and γ's gradient is computed from it (``z = (y - β) / γ``). That output is
          usually saved by the next op anyway
          (GELU, attention), so it costs no memory, unlike ``x * γ + β``, which keeps its own input. Where the
          input is the one kept anyway (``keep_input``: ``proj`` after attention, outside ViT's fused block chain),
          it is saved instead and ``z`` is recomputed from it. ``keep="nothing"`` saves neither and leaves γ/β's
          gradients to the caller (``proj`` and ``fc2`` in the chain, see ``adapters.vit_block``).
        """
        base = self.base_layer
        scale, shift = self.task_rows(index)
        if self._fast_kind == "layer_norm":
            bias = base.bias * scale + shift if shift is not None else None
            return F.layer_norm(x, base.normalized_shape, base.weight * scale, bias, base.eps)
        keep = keep or ("input" if self.keep_input else "output")
        args = (self._fast_kind, keep, conv_args(base), activation, heads)
        return FrozenOpSSF.apply(x, base.weight, base.bias, scale, shift, *args)

    def fast_forward_gelu(self, x: torch.Tensor) -> torch.Tensor:
        """``gelu(self(x))`` on the fused path of a Linear site (an MLP's ``fc1``, see ``ssf_tasks.adapters.vit_mlp``).

        One op, whose backward runs GELU's backward and this site's two column sums in one pass.
        """
        return self._fast_forward(x, self.routing.index, "gelu")

    def fast_forward_heads(self, x: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, H, N, d]`` split off ``self(x)`` as timm's ``Attention`` splits its ``qkv`` output, on the
        fused path of a Linear site (attention's ``qkv``, see ``ssf_tasks.kernels.qkv_backward``).

        One op, whose backward lays dq, dk and dv out as this site's output gradient and takes its two column
        sums in one pass.
        """
        return self._fast_forward(x, self.routing.index, heads=heads)

    def fast_forward_sums_elsewhere(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` on the fused path of a Linear site whose γ/β gradients the caller computes.

        The op saves no activation and its backward gives the input gradient only. Used where the output joins
        the residual stream and the next LayerNorm's backward takes this site's sums too (``adapters.vit_block``).
        """
        return self._fast_forward(x, self.routing.index, keep="nothing")


def _fast_kind(base: nn.Module, rule: SiteRule) -> str | None:
    """Which fused path an op may take; None keeps the eager path (other norms, fused norm+act, exotic convs)."""
    if rule.norm_forward is not None:
        return None
    if type(base) is nn.Linear:
        return "linear"
    if type(base) is nn.Conv2d and is_patchify(base):
        return "conv2d"
    layer_norm_types = (nn.LayerNorm, getattr(timm_layers, "LayerNorm", nn.LayerNorm))
    if type(base) in layer_norm_types and rule.channel_axis == -1 and base.bias is not None:
        return "layer_norm"
    return None
