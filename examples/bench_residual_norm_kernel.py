"""Micro-benchmark of the residual-stream backward kernel (ssf_tasks.fused_block) against torch.compile.

One ViT-B LayerNorm site at batch 64 ([64·197, 768], gradients of the norm's output in bf16, the residual
stream in fp32, as under bf16 autocast): torch.compile's LayerNorm backward with the residual add and no sums
(what the frozen backbone's step runs), the same with the six column sums written in torch (what torch.compile
would make of the op's backward), and the Triton kernel at a set of tiles, each checked against an fp64
reference. Timed one call at a time from Python: it ranks tiles; only the training step's profile compares the
kernel with torch.compile's kernels in place. Needs a CUDA GPU and Triton.
Results: examples/bench_results/residual_norm_kernel_*.txt.

    PYTHONPATH=. python examples/bench_residual_norm_kernel.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from triton.testing import do_bench

from ssf_tasks import fused_block


def _inputs(rows: int, channels: int):
    torch.manual_seed(0)
    d_h = torch.randn(rows, channels, device="cuda").bfloat16()
    d_out = torch.randn(rows, channels, device="cuda")
    x_in = torch.randn(rows, channels, device="cuda")
    x_out = x_in + torch.randn(rows, channels, device="cuda").bfloat16().float()
    weight = 1 + 0.1 * torch.randn(channels, device="cuda")
    return d_h, d_out, x_out, x_in, weight


def _floor_backward(d_h, d_out, x_out, weight, eps: float = 1e-6):
    """A LayerNorm's input gradient plus the residual gradient, fp32 and a bf16 copy: the frozen step's work."""
    x = x_out.float()
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    rstd = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    x_hat = centred * rstd
    g = d_h.float() * weight
    dx = d_out + rstd * (g - g.mean(-1, keepdim=True) - x_hat * (g * x_hat).mean(-1, keepdim=True))
    return dx, dx.bfloat16()


def _errors(result, expected) -> str:
    names = ("dx", "dy", "sums")
    parts = []
    for name, a, b in zip(names, result, expected, strict=True):
        parts.append(f"{name} {float((a.double() - b.double()).abs().max() / b.double().abs().max()):.1e}")
    return " ".join(parts)


def main(sweep: bool, rows: int = 64 * 197, channels: int = 768) -> tuple[int, int, int, int] | None:
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    d_h, d_out, x_out, x_in, weight = _inputs(rows, channels)
    eps = 1e-6
    expected = fused_block._residual_norm_backward_torch(
        d_h.double(), d_out.double(), x_out.double(), x_in.double(), weight.double(), eps, torch.float64
    )
    floor = torch.compile(_floor_backward)
    in_torch = torch.compile(fused_block._residual_norm_backward_torch)
    t_floor = do_bench(lambda: floor(d_h, d_out, x_out, weight), warmup=50, rep=300) * 1000
    print(f"[{rows}, {channels}]: LayerNorm backward + residual, no sums (torch.compile): {t_floor:.1f} us")
    args = (d_h, d_out, x_out, x_in, weight, eps, torch.bfloat16)
    t_torch = do_bench(lambda: in_torch(*args), warmup=50, rep=300) * 1000
    print(f"   the same with the six sums (torch.compile): {t_torch:.1f} us  {_errors(in_torch(*args), expected)}")
    default = (fused_block._BLOCK_R, fused_block._WARPS, fused_block._PROGRAMS, fused_block._STAGES)
    tiles = [default]
    if sweep:  # around the best of a first sweep of 48 tiles (residual_norm_kernel_sweep1_session7_h200.txt)
        grid = itertools.product((1, 2, 4), (4, 8), (264, 528), (1, 2))
        tiles += [t for t in grid if t != default]
    best = None
    for block_r, warps, programs, stages in tiles:
        fused_block._BLOCK_R, fused_block._WARPS, fused_block._PROGRAMS = block_r, warps, programs
        fused_block._STAGES = stages
        try:
            result = fused_block._residual_norm_backward_op(*args)
            t = do_bench(lambda: fused_block._residual_norm_backward_op(*args), warmup=50, rep=300) * 1000
        except Exception as error:  # a tile that does not compile (registers, shared memory) is reported
            print(f"   kernel {block_r} rows, {warps} warps, {programs} programs, {stages} stages: failed ({error})")
            continue
        print(
            f"   kernel {block_r} rows, {warps} warps, {programs} programs, {stages} stages: {t:.1f} us "
            f"({t / t_floor:.2f}x the floor's)  {_errors(result, expected)}",
            flush=True,
        )
        if best is None or t < best[0]:
            best = (t, (block_r, warps, programs, stages))
    fused_block._BLOCK_R, fused_block._WARPS, fused_block._PROGRAMS, fused_block._STAGES = default
    if best is not None:
        print(f"best: {best[1]} at {best[0]:.1f} us")
        return best[1]
    return None


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time 23 tiles besides the default")
    main(parser.parse_args().sweep)
