"""Micro-benchmark of the residual-stream backward kernel (``ssf_tasks.kernels.residual_norm``).

Why: left to torch.compile, the γ/β sums of ``proj`` and ``fc2`` are passes of their own over the residual stream's
gradient, and each LayerNorm site's sums end in a reduction of their own; the kernel keeps all five column sums in the
LayerNorm backward's one pass. One ViT-B LayerNorm site at batch 64 ([64·197, 768], gradients of the norm's output in
bf16, the residual stream in fp32, as under bf16 autocast): torch.compile's LayerNorm backward with the residual add
and no sums (what the frozen backbone's step runs), the same with the five column sums written in torch (what
torch.compile would make of the op's backward), and the Triton kernel at a set of tiles (which also forms the five
gradients from the sums), each checked against an fp64 reference. The op runs without ``x_in``, as every op of the
chain but the first does. It ranks tiles; only the training step's profile compares the kernel with torch.compile's
kernels in place. Times are of CUDA-graph replays (``do_bench_cudagraph``), so the host's launch time is left out.
Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel residual-norm [--sweep]
"""

from __future__ import annotations

import itertools

import torch
import triton
from triton.testing import do_bench_cudagraph

from ssf_tasks.kernels import residual_norm

from .tiles import time_tiles

__all__ = ["main"]


def _inputs(rows: int, channels: int):
    torch.manual_seed(0)
    d_h = torch.randn(rows, channels, device="cuda").bfloat16()
    d_out = torch.randn(rows, channels, device="cuda")
    x_in = torch.randn(rows, channels, device="cuda")
    x_out = x_in + torch.randn(rows, channels, device="cuda").bfloat16().float()
    weight = 1 + 0.1 * torch.randn(channels, device="cuda")
    _, mean, rstd = torch.ops.aten.native_layer_norm(x_out, [channels], None, None, 1e-6)
    return d_h, d_out, x_out, x_in, mean.flatten(), rstd.flatten(), weight


def _floor_backward(d_h, d_out, x_out, mean, rstd, weight):
    """A LayerNorm's input gradient plus the residual gradient, fp32 and a bf16 copy: the frozen step's work."""
    rstd = rstd[:, None]
    x_hat = (x_out - mean[:, None]) * rstd
    g = d_h.float() * weight
    dx = d_out + rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return dx, dx.bfloat16()


def _errors(result, expected, last: str = "sums") -> str:
    names = ("dx", "dy", last)
    parts = []
    for name, a, b in zip(names, result, expected, strict=True):
        parts.append(f"{name} {float((a.double() - b.double()).abs().max() / b.double().abs().max()):.1e}")
    return " ".join(parts)


def main(sweep: bool = False, rows: int = 64 * 197, channels: int = 768) -> tuple | None:
    """Time the two torch.compile baselines and the kernel at its own tile (``sweep``: and 35 more); returns the
    fastest tile (None if none ran)."""
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    d_h, d_out, x_out, x_in, mean, rstd, weight = _inputs(rows, channels)
    wide = [t.double() for t in (d_h, d_out, x_out, x_in, mean, rstd, weight)]
    # without x_in, as every op of the chain but the first runs (residual_norm.ResidualNormSSF)
    expected = residual_norm._residual_norm_backward_torch(*wide[:3], None, *wide[4:], torch.float64)
    # the kernel also takes the sites' vectors: b, γ_n, γ_l, β_l and the next op's γ_l
    vectors = [c + 0.1 * torch.randn(channels, device="cuda") for c in (0, 1, 1, 0, 1)]
    wide_vectors = [v.double() for v in (weight, *vectors)]
    folded = wide_vectors[0] * wide_vectors[2]  # w ⊙ γ_n
    dx, dy, sums = residual_norm._residual_norm_backward_torch(*wide[:3], None, *wide[4:6], folded, torch.float64)
    grads = residual_norm._gradients_from_sums(sums, *wide_vectors[:2], *wide_vectors[3:])
    expected_kernel = (dx, dy, grads)
    floor = torch.compile(_floor_backward)
    in_torch = torch.compile(residual_norm._residual_norm_backward_torch)
    floor(d_h, d_out, x_out, mean, rstd, weight)  # compile before the graph capture
    t_floor = do_bench_cudagraph(lambda: floor(d_h, d_out, x_out, mean, rstd, weight), rep=300) * 1000
    print(f"[{rows}, {channels}]: LayerNorm backward + residual, no sums (torch.compile): {t_floor:.1f} us")
    args = (d_h, d_out, x_out, None, mean, rstd, weight, torch.bfloat16)
    in_torch(*args)
    t_torch = do_bench_cudagraph(lambda: in_torch(*args), rep=300) * 1000
    print(f"   the same with the five sums (torch.compile): {t_torch:.1f} us  {_errors(in_torch(*args), expected)}")
    names = ("_BLOCK_R", "_WARPS", "_PROGRAMS_PER_SM", "_STAGES")
    # up to one program per row block (2**20 per multiprocessor asked for), as inductor's own LayerNorm backward runs
    grid = itertools.product((4, 8, 16), (4, 8, 16), (2, 8, 32, 2**20), (1,)) if sweep else ()
    kernel_args = (d_h, d_out, x_out, None, mean, rstd, weight, *vectors, torch.bfloat16)
    run = lambda: residual_norm._residual_norm_backward_op(*kernel_args)  # noqa: E731
    describe = lambda r: _errors(r, expected_kernel, "grads")  # noqa: E731
    return time_tiles(residual_norm, names, grid, run, describe, t_floor, "the floor's")
