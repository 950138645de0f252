"""Micro-benchmark of the qkv backward kernel (``ssf_tasks.kernels.qkv_backward``) against torch.compile.

Why: the ``qkv`` site's gradient is dq/dk/dv copied side by side, and its γ/β gradients two column sums over it;
torch.compile takes three kernels that read the q/k/v gradients twice more, the kernel reads each once. One ViT-B
attention at batch 64: q, k, v split off a bf16 ``[64, 197, 2304]`` qkv output as timm splits it, and their gradients
as SDPA's backward gives them (its own strides). Timed: torch.compile's copy of dq/dk/dv into the qkv gradient with no
sums (what the frozen backbone's step runs), the same with the two column sums in torch (what torch.compile makes of
the site's backward without the kernel), and the Triton kernel at a set of tiles (which also forms the site's
gradients from the sums), each checked against an fp64 reference. Times are of CUDA-graph replays
(``do_bench_cudagraph``), so the host's launch time is left out; they rank tiles, and only the training step's profile
compares kernels in place. Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel qkv-backward [--sweep]
"""

from __future__ import annotations

import itertools

import torch
import triton
from triton.testing import do_bench_cudagraph

from ssf_tasks.kernels import qkv_backward

from .tiles import time_tiles

__all__ = ["main"]


def _inputs(batch: int, tokens: int, heads: int, head_dim: int):
    torch.manual_seed(0)
    y = torch.randn(batch, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = y.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    return dq, dk, dv, y.detach()


def _copy_only(dq, dk, dv, y):
    return torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(y.shape)


def _errors(result, expected, second: str = "sums") -> str:
    dy = float((result[0].double() - expected[0]).abs().max())
    sums = float((result[1].double() - expected[1]).abs().max() / expected[1].abs().max())
    return f"dy {dy:.1e} {second} {sums:.1e}"


def main(sweep: bool = False, shape: tuple[int, int, int, int] = (64, 197, 12, 64)) -> tuple | None:
    """Time the two torch.compile baselines and the kernel at its own tile (``sweep``: and 47 more); returns the
    fastest tile (None if none ran). ``shape``: batch, tokens, heads, head size."""
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    args = _inputs(*shape)
    dq, dk, dv, y = args
    print(f"gradient strides: dq {dq.stride()} dk {dk.stride()} dv {dv.stride()}")
    expected = qkv_backward._qkv_backward_sums_torch(*[t.double() for t in args])
    floor = torch.compile(_copy_only)
    floor(*args)  # compile before the graph capture
    t_floor = do_bench_cudagraph(lambda: floor(*args), rep=300) * 1000
    print(f"{shape}: dq/dk/dv copied into the qkv gradient, no sums (torch.compile): {t_floor:.1f} us")
    in_torch = torch.compile(qkv_backward._qkv_backward_sums_torch)
    in_torch(*args)
    t_torch = do_bench_cudagraph(lambda: in_torch(*args), rep=300) * 1000
    print(f"   the same with the two sums (torch.compile): {t_torch:.1f} us  {_errors(in_torch(*args), expected)}")
    names = ("_BLOCK_R", "_BLOCK_C", "_WARPS", "_PROGRAMS_PER_SM", "_STAGES")
    grid = itertools.product((16, 32, 64), (128, 256), (4, 8), (4, 8), (1, 3)) if sweep else ()
    # the kernel also forms the site's gradients from the sums, with its γ and β
    scale, shift = 1 + 0.1 * torch.randn(y.shape[-1], device="cuda"), 0.1 * torch.randn(y.shape[-1], device="cuda")
    grads = qkv_backward._gradients_from_sums(expected[1], scale.double(), shift.double())
    expected_kernel = (expected[0], grads)
    run = lambda: qkv_backward._qkv_backward_op(*args, scale, shift)  # noqa: E731
    describe = lambda r: _errors(r, expected_kernel, "grads")  # noqa: E731
    return time_tiles(qkv_backward, names, grid, run, describe, t_floor, "the copy's")
