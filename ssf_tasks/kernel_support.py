"""Triton for the training kernels, where it can serve them: ``triton`` and ``tl``, else None for both.

Why one place: each training kernel (``fused_mlp``, ``fused_qkv``, ``fused_block``) has a torch version that runs
where Triton is missing (CPU-only installs) or where torch cannot hand a Triton kernel to inductor
(``torch.library.triton_op``, torch 2.6 and later).
"""

from __future__ import annotations

import torch

__all__ = ["tl", "triton"]

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None
if not hasattr(torch.library, "triton_op"):
    triton = tl = None
