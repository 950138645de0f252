"""timm's ``Mlp`` with ``fc1``'s SSF and GELU as one op: in training (one backward kernel) and in mixed batches.

On the fused training path (one task per batch, on CUDA) ``fc1``, its SSF and GELU run as one op whose backward
is ``ssf_tasks.kernels.gelu_backward``; in mixed-batch inference on CUDA ``fc1`` runs raw and its per-sample SSF
with GELU is one kernel (``ssf_tasks.kernels.mixed_gelu``). Every other case is timm's own ``forward``.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp as TimmMlp
from torch import nn

from ..kernels.mixed_attention import linear_output_dtype
from ..kernels.mixed_gelu import mixed_gelu_available, mixed_ssf_gelu
from ..ssf import SSFLayer

__all__ = ["FusedGeluMlp", "adopt_fused_mlp"]


class FusedGeluMlp(TimmMlp):
    """timm's ``Mlp`` whose ``fc1`` runs with its SSF and GELU as one op on the fused training path, and as one
    kernel after the raw ``fc1`` in mixed-batch inference on CUDA.

    ``MultiTaskSSF`` gives this class to every eligible MLP (see :func:`adopt_fused_mlp`). Parameters and keys
    are timm's; every other case (the CPU by default, training on mixed batches) is timm's ``forward``.
    ``fused_mixed = False`` turns the mixed-batch kernel off (benchmarks, tests). The mixed path calls ``fc1``'s
    Linear and the kernel itself, so forward hooks on ``fc1`` and ``act`` do not run there.
    """

    fused_mixed: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mixed(x):
            site = self.fc1
            hidden = mixed_ssf_gelu(site.base_layer(x), site.ssf_scale, site.ssf_shift, site.routing.index)
            return self.drop2(self.fc2(self.norm(self.drop1(hidden))))
        if not self._fused(x):
            return super().forward(x)
        return self.drop2(self.fc2(self.norm(self.drop1(self.fc1.fast_forward_gelu(x)))))

    def _mixed(self, x: torch.Tensor) -> bool:
        return (
            self.fused_mixed
            and x.ndim == 3
            and self.fc1.routing.mixed_inference(x)
            and _is_exact_gelu(self.act)
            and mixed_gelu_available(x, linear_output_dtype(x))
        )

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """``drop1(act(fc1(x)))``, with ``fc1`` and GELU as one op on the fused path (the training chain of
        ``adapters.vit_block`` runs ``fc2`` itself)."""
        if self._fused(x):
            return self.drop1(self.fc1.fast_forward_gelu(x))
        return self.drop1(self.act(self.fc1(x)))

    def _fused(self, x: torch.Tensor) -> bool:
        site = self.fc1
        # A site told to keep its input (tests force it) and an activation swapped after adoption take timm's path.
        return site.uses_fast_path(x) and not site.keep_input and _is_exact_gelu(self.act)


def _is_exact_gelu(act: nn.Module) -> bool:
    return type(act) is nn.GELU and act.approximate == "none"


def adopt_fused_mlp(backbone: nn.Module) -> int:
    """Switch eligible MLPs to :class:`FusedGeluMlp`; returns how many.

    Eligible: exactly timm's ``Mlp`` with ``fc1`` an SSF site on a Linear with a bias and a shift, and exactly
    ``nn.GELU`` (the erf form) as its activation.
    """
    count = 0
    for module in backbone.modules():
        fc1 = getattr(module, "fc1", None)
        act = getattr(module, "act", None)
        if (
            type(module) is TimmMlp
            and isinstance(fc1, SSFLayer)
            and type(fc1.base_layer) is nn.Linear
            and fc1.base_layer.bias is not None
            and fc1.ssf_shift is not None
            and _is_exact_gelu(act)
        ):
            module.__class__ = FusedGeluMlp
            count += 1
    return count
