"""Micro-benchmark of the mixed-batch attention kernel (``ssf_tasks.kernels.mixed_attention``) against SDPA.

Why: the ``qkv`` projection's output goes straight into attention, so without the kernel its per-sample SSF is one
more read and write of the qkv tensor in every block; the kernel applies it while it loads q/k/v. One ViT-B attention
at batch 256: SDPA on raw q/k/v (what the plain backbone runs), the qkv SSF as its own pass followed by SDPA (what the
compiled mixed forward runs without the kernel), and the Triton kernel at several tile shapes (the partial last key
block short or padded to a whole block), with pointer loads and (on Hopper) TMA descriptor loads, each checked against
an fp32 reference. Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel attention
"""

from __future__ import annotations

import torch
import triton
from torch.nn import functional as F
from triton.testing import do_bench

from ssf_tasks.kernels import mixed_attention

__all__ = ["main"]

TILES = [  # (BLOCK_M, BLOCK_N, num_warps, num_stages, short_tail)
    (64, 32, 4, 3, False),
    (64, 32, 4, 3, True),
    (64, 64, 4, 3, False),
    (64, 64, 4, 3, True),
    (128, 32, 4, 3, True),
]


def main(batch: int = 256, tokens: int = 197, heads: int = 12, head_dim: int = 64, tasks: int = 64) -> None:
    """Time SDPA, the separate SSF pass + SDPA, and the kernel at each of ``TILES``, printing one line each."""
    print("triton", triton.__version__, torch.cuda.get_device_name(), flush=True)
    width = 3 * heads * head_dim
    qkv = torch.randn(batch, tokens, width, device="cuda", dtype=torch.bfloat16)
    scale = (1 + 0.1 * torch.randn(tasks, width, device="cuda")).bfloat16()
    shift = (0.1 * torch.randn(tasks, width, device="cuda")).bfloat16()
    rows = torch.randint(0, tasks, (batch,), device="cuda")

    def plain():
        q, k, v = qkv.view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    reference = mixed_attention.mixed_ssf_attention_reference(qkv.float(), scale.float(), shift.float(), rows, heads)
    separate_pass = torch.compile(
        lambda: mixed_attention.mixed_ssf_attention_reference(qkv, scale, shift, rows, heads), dynamic=False
    )

    def error(out: torch.Tensor) -> float:
        return ((out.float() - reference).norm() / reference.norm()).item()

    plain_us = do_bench(plain, return_mode="median") * 1e3
    separate_us = do_bench(separate_pass, return_mode="median") * 1e3
    print(
        f"B={batch}: plain SDPA {plain_us:.1f} us; SSF pass + SDPA (compiled) {separate_us:.1f} us "
        f"err {error(separate_pass()):.1e}",
        flush=True,
    )
    loads = ["pointer", "tma"] if mixed_attention.tma_available(qkv) else ["pointer"]
    for load, (block_m, block_n, warps, stages, short) in [(ld, tile) for ld in loads for tile in TILES]:
        config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "short_tail": short}
        out = torch.full((batch, tokens, heads * head_dim), float("nan"), device="cuda", dtype=torch.bfloat16)

        def run(config=config, out=out, tma=load == "tma"):
            mixed_attention._launch(qkv, scale, shift, rows, out, heads, config, tma)

        try:
            run()
            kernel_us = do_bench(run, return_mode="median") * 1e3
        except Exception as failure:  # a tile shape may not fit the card's shared memory
            print(f"   {load} {config}: failed: {failure!r:.200}", flush=True)
            continue
        print(
            f"   triton, {load} loads, {config}: {kernel_us:.1f} us ({kernel_us / plain_us:.2f}x plain SDPA) "
            f"err {error(out):.1e}",
            flush=True,
        )
