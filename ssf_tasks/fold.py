"""Fold one task's γ/β into the backbone's own weights: a plain timm model with no SSF left.

SSF is linear, so ``γ ⊙ (W x + b) + β = (γ ⊙ W) x + (γ ⊙ b + β)``: the scale multiplies the op's
output-channel rows and the shift joins its bias. A site on a bias-free op has a scale only, so the folded
model keeps exactly timm's parameter keys and loads strictly into ``timm.create_model(name, num_classes=K)``.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .adapters import restore_timm_classes
from .errors import FoldError
from .kernels.frozen_op import fold_bias, fold_rows

if TYPE_CHECKING:
    from .model import MultiTaskSSF

__all__ = ["fold_task", "fold_error"]


def fold_task(model: MultiTaskSSF, name: str) -> nn.Module:
    """A new timm model of the backbone's class with task ``name``'s γ/β and head folded in.

    The shared backbone is not touched: the copy is made first (without the per-task tables, which may
    hold thousands of tasks) and only the copy's weights are rewritten, in float64 for exactness.

    Raises:
        TaskNotFoundError: no such task.
        FoldError: the task's γ/β or head hold non-finite values.
    """
    t = model.task_index(name)
    sites = model.named_sites()
    skip_tables = {id(p): None for _, s in sites for p in (s.ssf_scale, s.ssf_shift) if p is not None}
    folded = copy.deepcopy(model.backbone, memo=skip_tables)
    restore_timm_classes(folded)
    with torch.no_grad():
        for site_name, site in sites:
            base = folded.get_submodule(site_name).base_layer
            scale = site.ssf_scale[t].detach()
            shift = site.ssf_shift[t].detach() if site.ssf_shift is not None else None
            if not torch.isfinite(scale).all() or (shift is not None and not torch.isfinite(shift).all()):
                raise FoldError(f"task {name!r} has non-finite γ/β at site {site_name!r}; it cannot be folded")
            base.weight.copy_(fold_rows(base.weight.double(), scale).to(base.weight.dtype))
            if shift is not None:
                base.bias.copy_(fold_bias(base.bias.double(), scale, shift).to(base.bias.dtype))
            folded.set_submodule(site_name, base)
    k = model.num_classes(name)
    head_w, head_b = model.head_weight[t, :k].detach(), model.head_bias[t, :k].detach()
    if not (torch.isfinite(head_w).all() and torch.isfinite(head_b).all()):
        raise FoldError(f"task {name!r} has a non-finite head; it cannot be folded")
    folded.reset_classifier(k)
    classifier = folded.get_classifier()
    reference = model.head_weight
    classifier.to(device=reference.device, dtype=next(folded.parameters()).dtype)
    with torch.no_grad():
        classifier.weight.copy_(head_w.view_as(classifier.weight))  # a 1x1-conv classifier takes [K, D, 1, 1]
        classifier.bias.copy_(head_b)
    folded.requires_grad_(False)
    return folded.eval()


@torch.no_grad()
def fold_error(model: MultiTaskSSF, name: str, images: torch.Tensor, folded: nn.Module | None = None) -> float:
    """Max relative error of the folded model against the SSF model on ``images``: ``max|a-b| / max|b|``."""
    folded = folded if folded is not None else fold_task(model, name)
    reference = model(images, name)[:, : model.num_classes(name)].float()
    result = folded(images).float()
    return float((result - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
