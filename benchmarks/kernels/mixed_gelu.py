"""Micro-benchmark of the mixed-batch kernel of fc1's SSF with GELU (``ssf_tasks.kernels.mixed_gelu``).

Why: inductor fuses the gathered γ/β into the GELU kernel after ``fc1``, but computes every element's table address
from the task index, and Triton cannot vectorise such a load; the kernel loads each sample's γ/β once per chunk of its
tokens. ViT-B's ``fc1`` output at batch 256, ``[256, 197, 3072]`` bf16, 64 tasks mixed at random: torch.compile's GELU
alone (what the plain backbone runs), torch.compile's GELU with each sample's γ/β gathered in it (what the compiled
mixed forward runs without the kernel), and the Triton kernel at a set of tiles, each checked against the fp32
reference. Times are of CUDA-graph replays (``do_bench_cudagraph``); they rank tiles, and only the whole forward
(``ssf-tasks bench inference``) compares in place. Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel mixed-gelu [--sweep]
"""

from __future__ import annotations

import itertools

import torch
import triton
from torch.nn import functional as F
from triton.testing import do_bench_cudagraph

from ssf_tasks.kernels import mixed_gelu

from .tiles import time_tiles

__all__ = ["main"]


def main(
    sweep: bool = False, batch: int = 256, tokens: int = 197, channels: int = 3072, tasks: int = 64
) -> tuple | None:
    """Time the two torch.compile baselines and the kernel at its own tile (``sweep``: and 83 more); returns the
    fastest tile (None if none ran)."""
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    y = (2 * torch.randn(batch, tokens, channels, device="cuda")).bfloat16()
    scale = (1 + 0.2 * torch.randn(tasks, channels, device="cuda")).bfloat16()
    shift = (0.2 * torch.randn(tasks, channels, device="cuda")).bfloat16()
    task_rows = torch.randint(0, tasks, (batch,), device="cuda")
    expected = mixed_gelu.mixed_ssf_gelu_reference(y, scale, shift, task_rows).float()

    def error(result: torch.Tensor) -> str:
        return f"rel err {float((result.float() - expected).abs().max() / expected.abs().max()):.1e}"

    plain = torch.compile(F.gelu)
    plain(y)
    t_plain = do_bench_cudagraph(lambda: plain(y), rep=300) * 1000
    print(f"[{batch}, {tokens}, {channels}]: GELU alone (torch.compile): {t_plain:.1f} us")
    gathered = torch.compile(lambda y, s, b, t: F.gelu(y * s[t][:, None] + b[t][:, None]))
    gathered(y, scale, shift, task_rows)
    t_gathered = do_bench_cudagraph(lambda: gathered(y, scale, shift, task_rows), rep=300) * 1000
    result = gathered(y, scale, shift, task_rows)
    ratio = f"{t_gathered / t_plain:.2f}x"
    print(f"   γ/β gathered in the GELU kernel (torch.compile): {t_gathered:.1f} us ({ratio})  {error(result)}")
    # each tile's own tokens per program (batch 256 never needs the halving anyway); put back after the sweep
    min_programs, mixed_gelu._MIN_PROGRAMS_PER_SM = mixed_gelu._MIN_PROGRAMS_PER_SM, 0
    names = ("_BLOCK_R", "_BLOCK_C", "_WARPS", "_TOKENS", "_STAGES")
    tiles = itertools.product((1, 2, 4), (512, 1024), (4, 8), (1, 16, 64, 0), (1, 3))
    grid = [(r, c, w, max(t, r) if t else 0, s) for r, c, w, t, s in tiles if t != 1 or s == 1] if sweep else ()
    run = lambda: mixed_gelu._mixed_ssf_gelu_op(y, scale, shift, task_rows)  # noqa: E731
    try:
        return time_tiles(mixed_gelu, names, grid, run, error, t_plain, "GELU alone")
    finally:
        mixed_gelu._MIN_PROGRAMS_PER_SM = min_programs
