"""Micro-benchmark of fc1's GELU backward kernel with its column sums (ssf_tasks.fused_mlp) against torch.compile.

ViT-B's ``fc1`` output at batch 64, ``[64·197, 3072]`` bf16: torch.compile's GELU backward alone (what the frozen
backbone's step runs), the same with the two column sums in torch (what torch.compile makes of the site's
backward without the kernel), and the Triton kernel at a set of tiles, each checked against an fp64 reference.
Times are of CUDA-graph replays (``do_bench_cudagraph``), so the host's launch time is left out; they rank tiles,
and only the training step's profile compares kernels in place. Needs a CUDA GPU and Triton.
Results: examples/bench_results/gelu_backward_kernel_*.txt.

    PYTHONPATH=. python examples/bench_gelu_kernel.py [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
from kernel_tiles import time_tiles
from triton.testing import do_bench_cudagraph

from ssf_tasks import fused_mlp


def _errors(result, expected) -> str:
    parts = []
    for name, a, b in zip(("dy", "sum_dy", "sum_dy_y"), result, expected, strict=True):
        parts.append(f"{name} {float((a.double() - b).abs().max() / b.abs().max()):.1e}")
    return " ".join(parts)


def main(sweep: bool, rows: int = 64 * 197, channels: int = 3072) -> tuple | None:
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    dout = torch.randn(rows, channels, device="cuda").bfloat16()
    y = (2 * torch.randn(rows, channels, device="cuda")).bfloat16()
    expected = fused_mlp._gelu_backward_sums_torch(dout.double(), y.double())
    floor = torch.compile(lambda g, x: torch.ops.aten.gelu_backward(g, x))
    floor(dout, y)  # compile before the graph capture
    t_floor = do_bench_cudagraph(lambda: floor(dout, y), rep=300) * 1000
    print(f"[{rows}, {channels}]: GELU backward, no sums (torch.compile): {t_floor:.1f} us")
    in_torch = torch.compile(fused_mlp._gelu_backward_sums_torch)
    in_torch(dout, y)
    t_torch = do_bench_cudagraph(lambda: in_torch(dout, y), rep=300) * 1000
    print(f"   the same with the two sums (torch.compile): {t_torch:.1f} us  {_errors(in_torch(dout, y), expected)}")
    names = ("_BLOCK_R", "_BLOCK_C", "_WARPS", "_PROGRAMS")
    grid = itertools.product((2, 4, 8), (256, 512, 1024), (4, 8, 16), (528, 1056)) if sweep else ()
    run = lambda: fused_mlp._gelu_backward_sums_op(dout, y)  # noqa: E731
    return time_tiles(fused_mlp, names, grid, run, lambda r: _errors(r, expected), t_floor, "GELU's backward")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="store_true", help="time 53 tiles besides the default")
    main(parser.parse_args().sweep)
