"""timm's ViT ``Attention`` with SSF-aware paths: the mixed-batch attention kernel and ``qkv`` as one training op.

In a mixed batch on CUDA, attention runs ``ssf_tasks.kernels.mixed_attention`` on the raw ``qkv`` output, which
applies each sample's ``qkv`` SSF as it loads q/k/v; on the fused training path (one task per batch) q, k and v
come out of ``qkv`` as one op whose backward is ``ssf_tasks.kernels.qkv_backward``. Every other case is timm's.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn
from torch.nn import functional as F

from ..kernels.mixed_attention import linear_output_dtype, mixed_attention_available, mixed_ssf_attention
from ..ssf import SSFLayer

__all__ = ["MixedTaskAttention", "adopt_mixed_attention"]


class MixedTaskAttention(TimmAttention):
    """timm's ``Attention`` whose mixed-batch inference on CUDA runs :func:`mixed_ssf_attention`, and whose ``qkv``
    on the fused training path (one task per batch, on CUDA) hands q, k, v to SDPA from one op
    (``SSFLayer.fast_forward_heads``, see ``ssf_tasks.kernels.qkv_backward``).

    ``MultiTaskSSF`` gives this class to every eligible attention module of the backbone (see
    :func:`adopt_mixed_attention`); parameters, keys and every other case (the CPU by default, masks) stay timm's
    own ``forward``. ``fused_mixed = False`` turns the kernel off, ``fused_qkv = False`` the one-op ``qkv``
    (benchmarks, tests). The one-op ``qkv`` calls the site's op itself, so forward hooks on ``qkv`` do not run
    there.
    """

    fused_mixed: bool = True
    fused_qkv: bool = True

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # timm's optional arguments (attn_mask, is_causal) differ across versions; any that is set takes timm's path.
        site = self.qkv
        plain_call = not any(a is not None and a is not False for a in (*args, *kwargs.values()))
        if (
            self.fused_mixed
            and plain_call
            and site.routing.mixed_inference(x)
            and mixed_attention_available(x, linear_output_dtype(x))
        ):
            index = site.routing.index
            out = mixed_ssf_attention(site.base_layer(x), site.ssf_scale, site.ssf_shift, index, self.num_heads)
            return self.proj_drop(self.proj(out))
        if plain_call and self._one_op_qkv(x):
            return self.proj_drop(self.proj(self.attend(x)))
        return super().forward(x, *args, **kwargs)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output before ``proj``: timm's ``forward`` up to ``proj`` for an adopted module (no q/k or
        output norm, no gate, no mask), with ``qkv`` as one op on the fused path.

        The fused training chain (``adapters.vit_block``) calls it and runs ``proj`` itself, so that
        ``proj``'s γ/β gradients come out of the next LayerNorm's backward.
        """
        batch, tokens, _ = x.shape
        if self._one_op_qkv(x):
            q, k, v = self.qkv.fast_forward_heads(x, self.num_heads)
        else:
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)

    def _one_op_qkv(self, x: torch.Tensor) -> bool:
        site = self.qkv
        # A site told to keep its input (tests force it) takes timm's path.
        return self.fused_qkv and site.uses_fast_path(x) and not site.keep_input


def adopt_mixed_attention(backbone: nn.Module) -> int:
    """Switch eligible attention modules to :class:`MixedTaskAttention`; returns how many.

    Eligible: exactly timm's ``Attention`` with its ``qkv`` already an SSF site with a shift, no q/k or output
    norm, no gate, and a head size the kernel takes. Only the class changes, so nothing else can tell.
    """
    count = 0
    for module in backbone.modules():
        qkv = getattr(module, "qkv", None)
        if (
            type(module) is TimmAttention
            and isinstance(qkv, SSFLayer)
            and type(qkv.base_layer) is nn.Linear
            and qkv.ssf_shift is not None
            and all(isinstance(getattr(module, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
            and getattr(module, "gate", None) is None
            and module.head_dim in (16, 32, 64, 128)
            and module.num_heads * module.head_dim * 3 == qkv.channels
        ):
            module.__class__ = MixedTaskAttention
            if isinstance(module.proj, SSFLayer):
                # Attention keeps its output for its own backward: the fused training path of ``proj`` keeps
                # that (its input) too, rather than its own output, which nothing else keeps. (In ViT's fused block
                # chain ``proj`` keeps nothing: its sums come out of the next norm's backward, see vit_block.)
                module.proj.keep_input = True
            count += 1
    return count
