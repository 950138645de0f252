"""Micro-benchmark of fc1's GELU backward kernel with its column sums (``ssf_tasks.kernels.gelu_backward``).

Why: on the fused training path ``fc1``'s γ/β gradients are two column sums over GELU's backward; left to
torch.compile they become a reduction kernel of their own that reads the tensors again. ViT-B's ``fc1`` output at
batch 64, ``[64·197, 3072]`` bf16: torch.compile's GELU backward alone (what the frozen backbone's step runs), the
same with the two column sums in torch (what torch.compile makes of the site's backward without the kernel), and the
Triton kernel at a set of tiles, each checked against an fp64 reference. Times are of CUDA-graph replays
(``do_bench_cudagraph``), so the host's launch time is left out; they rank tiles, and only the training step's profile
compares kernels in place. Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel gelu-backward [--sweep]
"""

from __future__ import annotations

import itertools

import torch
import triton
from triton.testing import do_bench_cudagraph

from ssf_tasks.kernels import gelu_backward

from .tiles import time_tiles

__all__ = ["main"]


def _errors(result, expected) -> str:
    parts = []
    for name, a, b in zip(("dy", "sum_dy", "sum_dy_y"), result, expected, strict=True):
        parts.append(f"{name} {float((a.double() - b).abs().max() / b.abs().max()):.1e}")
    return " ".join(parts)


def main(sweep: bool = False, rows: int = 64 * 197, channels: int = 3072) -> tuple | None:
    """Time the two torch.compile baselines and the kernel at its own tile (``sweep``: and 53 more); returns the
    fastest tile (None if none ran)."""
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    dout = torch.randn(rows, channels, device="cuda").bfloat16()
    y = (2 * torch.randn(rows, channels, device="cuda")).bfloat16()
    expected = gelu_backward._gelu_backward_sums_torch(dout.double(), y.double())
    floor = torch.compile(lambda g, x: torch.ops.aten.gelu_backward(g, x))
    floor(dout, y)  # compile before the graph capture
    t_floor = do_bench_cudagraph(lambda: floor(dout, y), rep=300) * 1000
    print(f"[{rows}, {channels}]: GELU backward, no sums (torch.compile): {t_floor:.1f} us")
    in_torch = torch.compile(gelu_backward._gelu_backward_sums_torch)
    in_torch(dout, y)
    t_torch = do_bench_cudagraph(lambda: in_torch(dout, y), rep=300) * 1000
    print(f"   the same with the two sums (torch.compile): {t_torch:.1f} us  {_errors(in_torch(dout, y), expected)}")
    names = ("_BLOCK_R", "_BLOCK_C", "_WARPS", "_PROGRAMS_PER_SM")
    grid = itertools.product((2, 4, 8), (256, 512, 1024), (4, 8, 16), (4, 8)) if sweep else ()
    run = lambda: gelu_backward._gelu_backward_sums_op(dout, y)  # noqa: E731
    describe = lambda r: _errors(r, expected)  # noqa: E731
    return time_tiles(gelu_backward, names, grid, run, describe, t_floor, "GELU's backward")
