"""The SSF wrapper layer: a frozen op followed by a per-task, per-channel scale and shift.

Each ``SSFLayer`` keeps the original module as ``base_layer`` and holds one table row per task
(``ssf_scale`` / ``ssf_shift``: ``[num_tasks, channels]``). Which row a sample uses is read from a
``TaskRouting`` object shared by every site of one model, so a mixed batch is served by gathering rows,
with no loop over tasks. A layer whose op has no bias gets a scale only: its shift could not be folded
into timm's own parameter keys (and a norm right after it has a shift of its own).
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import BatchMismatchError, SSFTasksError
from .sites import SiteRule

__all__ = ["SSFLayer", "TaskRouting"]


class TaskRouting:
    """The task of every sample in the batch being run, shared by all sites of one model.

    ``index`` is an ``int`` when the whole batch belongs to one task (rows broadcast, no gather), a
    ``LongTensor [B]`` for a mixed batch, and ``None`` outside ``MultiTaskSSF.forward``.
    """

    __slots__ = ("index",)

    def __init__(self) -> None:
        self.index: int | torch.Tensor | None = None


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
        if self._norm_forward is None:
            return self._scale_shift(self.base_layer(x))
        # Fused norm+act: SSF sits between the norm and the activation, where it can still be folded.
        y = self._scale_shift(self._norm_forward(self.base_layer, x))
        return self.base_layer.act(self.base_layer.drop(y))

    def _scale_shift(self, y: torch.Tensor) -> torch.Tensor:
        index = self.routing.index
        if index is None:
            raise SSFTasksError("an SSF site ran without a task: call MultiTaskSSF(images, tasks), not the backbone")
        scale = self.ssf_scale[index]
        shift = self.ssf_shift[index] if self.ssf_shift is not None else None
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
