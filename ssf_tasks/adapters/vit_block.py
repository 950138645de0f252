"""A ViT's ``blocks`` whose fused training path runs each residual add and LayerNorm as one op.

Each op (``ssf_tasks.kernels.residual_norm``) also takes the γ/β gradients of the Linear site before it, so
``proj`` and ``fc2`` keep no activation for backward. Block ``l``'s ``fc2`` output is added to the residual stream
by block ``l + 1``'s ``norm1``, so the chain carries it over. Every other case is timm's own forward.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from ..kernels.residual_norm import ResidualNormSSF, ResidualSSF
from ..ssf import SSFLayer
from .vit_attention import MixedTaskAttention
from .vit_mlp import FusedGeluMlp

__all__ = ["FusedBlockChain", "adopt_fused_blocks"]


def _residual_norm(x, y, linear_site, norm_site, read_x_in: bool, next_site: nn.Module | None):
    """The op for ``x + y`` then ``norm_site``; ``next_site`` is the Linear whose op takes this op's output as its
    ``x_in`` without reading it (see ``ResidualNormSSF``), None if there is none."""
    norm = norm_site.base_layer
    scale, shift = norm_site.task_rows(norm_site.routing.index)
    args = (norm.weight, norm.bias, scale, shift, norm.eps, read_x_in)
    next_scale = next_site.task_rows(next_site.routing.index)[0] if next_site is not None else None
    return ResidualNormSSF.apply(x, y, *linear_site.task_rows(linear_site.routing.index), *args, next_scale)


class FusedBlockChain(nn.Sequential):
    """A ViT's ``blocks`` whose fused training path runs each residual add and LayerNorm as one op.

    ``MultiTaskSSF`` gives this class to ``blocks`` when every block is eligible (see :func:`adopt_fused_blocks`);
    modules and keys stay timm's, and every case the fused path does not take is ``nn.Sequential``'s forward.
    On the fused path the blocks' submodules are called by the chain, so forward hooks on a block, its ``attn``,
    ``mlp``, ``proj``, ``fc2`` or a later block's ``norm1`` do not run there.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fused(x):
            return super().forward(x)
        pending = None  # the previous block's fc2 output and site, not yet added to the residual stream
        last = len(self) - 1
        for i, block in enumerate(self):
            proj = block.attn.proj
            if pending is None:
                h = block.norm1(x)
            else:  # its output is the x_in of proj's op below, which leaves the stream read to this one
                x, h = _residual_norm(x, *pending, block.norm1, read_x_in=False, next_site=proj)
            y = proj.fast_forward_sums_elsewhere(block.attn.attend(h))
            # The first block's stream input comes from outside the chain, so its op reads it; fc2's op follows
            # in every block but the last (whose fc2 output is added by ResidualSSF, which reads its input).
            next_site = block.mlp.fc2 if i < last else None
            x, h = _residual_norm(x, y, proj, block.norm2, read_x_in=i == 0, next_site=next_site)
            mlp = block.mlp
            hidden = mlp.hidden(h) if isinstance(mlp, FusedGeluMlp) else mlp.drop1(mlp.act(mlp.fc1(h)))
            pending = (mlp.fc2.fast_forward_sums_elsewhere(mlp.norm(hidden)), mlp.fc2)
        y, fc2 = pending
        return ResidualSSF.apply(x, y, *fc2.task_rows(fc2.routing.index))

    def _fused(self, x: torch.Tensor) -> bool:
        """The fused path applies to this batch (one task, CUDA or forced) and no dropout is active."""
        if len(self) == 0 or not self[0].norm1.uses_fast_path(x):
            return False
        if not self.training:
            return True
        return all(_dropout_off(block) for block in self)


def _dropout_off(block: nn.Module) -> bool:
    drops = (block.attn.proj_drop, block.mlp.drop2)
    return all(not isinstance(d, nn.Dropout) or d.p == 0 for d in drops)


def _is_ssf_site(module: nn.Module, kind: str) -> bool:
    return (
        isinstance(module, SSFLayer)
        and module._fast_kind == kind
        and module.ssf_shift is not None
        and getattr(module.base_layer, "bias", None) is not None
    )


def _eligible_block(block: nn.Module) -> bool:
    """Exactly timm's ``Block`` with SSF LayerNorms, adopted attention, an SSF ``proj``/``fc2`` with shifts, and
    no layer scale or stochastic depth (the chain adds each branch to the residual stream as it is)."""
    mlp = getattr(block, "mlp", None)
    attn = getattr(block, "attn", None)
    return (
        type(block) is TimmBlock
        and type(attn) is MixedTaskAttention
        and type(mlp) in (TimmMlp, FusedGeluMlp)
        and all(_is_ssf_site(getattr(block, n), "layer_norm") for n in ("norm1", "norm2"))
        and _is_ssf_site(attn.proj, "linear")
        and _is_ssf_site(mlp.fc2, "linear")
        and all(type(getattr(block, n)) is nn.Identity for n in ("ls1", "ls2", "drop_path1", "drop_path2"))
    )


def adopt_fused_blocks(backbone: nn.Module) -> bool:
    """Switch ``backbone.blocks`` to :class:`FusedBlockChain` if it is an ``nn.Sequential`` of eligible blocks."""
    blocks = getattr(backbone, "blocks", None)
    if type(blocks) is not nn.Sequential or len(blocks) == 0 or not all(_eligible_block(b) for b in blocks):
        return False
    blocks.__class__ = FusedBlockChain
    return True
