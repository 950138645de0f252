"""Training an MLP's ``fc1`` site: GELU's backward and the site's γ/β gradients in one pass (Triton on CUDA).

Why: in the fused training path (``ssf._FrozenOpSSF``) a Linear site's gradients are two column sums,
``Σ dy`` and ``Σ dy ⊙ y``, over every row (sample and token) of the op's output ``y`` and its gradient ``dy``.
For ``fc1`` of a ViT MLP, ``dy`` is GELU's backward, ``dy = dout ⊙ gelu'(y)``. Left to torch.compile, the sums
become a reduction kernel of their own that reads ``dout`` and ``y`` again and recomputes GELU's backward: at
batch 64 on ViT-B that took 1.2 ms of a 20 ms step (BENCHMARKS.md), the largest single piece of what SSF adds
to a frozen backbone's backward. The kernel here reads ``dout`` and ``y`` once, writes ``dy`` (which the input
gradient needs anyway) and keeps the two sums as it goes: the same memory traffic as GELU's backward alone (on
an H100 it takes 97.7 µs per ViT-B block where GELU's backward alone takes 84.1 µs, and torch.compile's two
kernels took 181.7 µs).

``FusedGeluMlp`` is timm's ``Mlp`` whose fused training path (one task per batch, on CUDA) runs ``fc1``, its
SSF and GELU as one op with this backward, and whose mixed-batch inference on CUDA runs ``fc1`` raw and then
its per-sample SSF with GELU as one kernel (``ssf_tasks.mixed_gelu``); every other case is timm's own ``forward``.
"""

from __future__ import annotations

import torch
from timm.layers import Mlp as TimmMlp
from torch import nn

from .kernel_support import row_chunks, tl, triton
from .mixed_attention import linear_output_dtype
from .mixed_gelu import mixed_gelu_available, mixed_ssf_gelu

__all__ = ["FusedGeluMlp", "adopt_fused_mlp", "gelu_backward_sums"]


def gelu_backward_sums(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dy, Σ dy, Σ dy ⊙ y)`` for ``out = gelu(y)`` (exact, erf form), sums over every axis but the last.

    ``dy`` has ``y``'s dtype; the two ``[C]`` sums are fp32 (fp64 for fp64 input) and are taken over ``dy`` as
    returned (rounded to its dtype), so they are the gradients of exactly the ``dy`` that flows on to the op's
    input.
    """
    if dout.shape != y.shape:
        raise ValueError(f"gelu_backward_sums needs tensors of one shape, got {tuple(dout.shape)} and {tuple(y.shape)}")
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if triton is not None and y.is_cuda and y.dtype in kernel_dtypes and y.numel() > 0 and y.is_contiguous():
        return _gelu_backward_sums_op(dout.contiguous(), y)
    return _gelu_backward_sums_torch(dout, y)


def _gelu_backward_sums_torch(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dy = torch.ops.aten.gelu_backward(dout.to(y.dtype), y)
    accumulate = torch.promote_types(dy.dtype, torch.float32)
    rows = dy.reshape(-1, dy.shape[-1]).to(accumulate)
    return dy, rows.sum(0), (rows * y.reshape(rows.shape).to(accumulate)).sum(0)


if triton is not None:

    @triton.jit
    def _gelu_backward_sums_kernel(
        dout_ptr,
        y_ptr,
        dy_ptr,
        partial_dy_ptr,
        partial_dy_y_ptr,
        rows,
        channels,
        rows_per_chunk,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # One program per (block of channels, chunk of rows): writes dy for its tile and one row of partial sums.
        columns = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        chunk = tl.program_id(1)
        column_ok = columns < channels
        acc_dy = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        acc_dy_y = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        first = chunk * rows_per_chunk
        last = tl.minimum(first + rows_per_chunk, rows)
        for start in tl.range(first, last, BLOCK_R):
            row = start + tl.arange(0, BLOCK_R)
            ok = (row < last)[:, None] & column_ok[None, :]
            offsets = row.to(tl.int64)[:, None] * channels + columns[None, :]
            g = tl.load(dout_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
            cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
            pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
            dy = (g * (cdf + y * pdf)).to(dy_ptr.dtype.element_ty)
            tl.store(dy_ptr + offsets, dy, mask=ok)
            dy = dy.to(tl.float32)
            acc_dy += dy
            acc_dy_y += dy * y
        out = chunk * channels + columns
        tl.store(partial_dy_ptr + out, tl.sum(acc_dy, 0), mask=column_ok)
        tl.store(partial_dy_y_ptr + out, tl.sum(acc_dy_y, 0), mask=column_ok)

    # Best tile in two sweeps (156 and 56 tiles) on H100s at ViT-B's fc1 shape, [64·197, 3072] bf16 (BENCHMARKS.md).
    _BLOCK_R, _BLOCK_C, _WARPS, _STAGES = 4, 512, 16, 1
    _PROGRAMS = 528  # four per streaming multiprocessor of an H100 (132); smaller cards run more waves

    # A ``triton_op``: torch.compile sees the kernel and launches it from its own generated code (no Python on
    # the way, so it also lives in CUDA graphs), and fuses the small sums of the partials after it.
    @torch.library.triton_op("ssf_tasks::gelu_backward_sums", mutates_args=())
    def _gelu_backward_sums_op(dout: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel on contiguous ``dout`` and ``y`` of one shape, channels last (see ``gelu_backward_sums``)."""
        channels = y.shape[-1]
        rows = y.numel() // channels
        column_blocks = triton.cdiv(channels, _BLOCK_C)
        chunks, rows_per_chunk = row_chunks(rows, _BLOCK_R, _PROGRAMS // column_blocks)
        dy = torch.empty_like(y)
        partial_dy = torch.empty(chunks, channels, device=y.device, dtype=torch.float32)
        partial_dy_y = torch.empty_like(partial_dy)
        torch.library.wrap_triton(_gelu_backward_sums_kernel)[(column_blocks, chunks)](
            dout, y, dy, partial_dy, partial_dy_y, rows, channels, rows_per_chunk,
            BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C, num_warps=_WARPS, num_stages=_STAGES,
        )  # fmt: skip
        return dy, partial_dy.sum(0), partial_dy_y.sum(0)


# ----------------------------------------------------------------------------------------------- the module
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
        ``ssf_tasks.fused_block`` runs ``fc2`` itself)."""
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
    from .ssf import SSFLayer

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
