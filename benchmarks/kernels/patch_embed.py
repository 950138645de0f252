"""Micro-benchmark of ViT-B's patch embedding (a 16×16 conv of stride 16) as cuDNN runs it and as one GEMM.

Why: in the training step's profile cuDNN's kernel for this conv, plus two layout conversions (NCHW to NHWC) around
it, took several times as long as the GEMM the conv amounts to ([64·196, 768] × [768, 768] at batch 64). A
non-overlapping conv is exactly that GEMM once the image is cut into patches (a reshape and a permute), which is how
ssf-tasks runs it on CUDA (``ssf_tasks.kernels.frozen_op.patchify_linear``). Timed, in bf16: ``F.conv2d`` with
``torch.backends.cudnn.benchmark`` off (the default) and on, and the patches GEMM, each eager and compiled, at batch
64 and 256; for training, also the conv's weight gradient (what full fine-tuning adds). Each result is checked against
an fp64 conv. Times are of CUDA-graph replays (``do_bench_cudagraph``), so the host's launch time is left out. Needs a
CUDA GPU. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel patch-embed
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from ssf_tasks.kernels.frozen_op import patchify_linear

__all__ = ["main"]


def _conv(x, weight, bias):
    return F.conv2d(x, weight, bias, stride=16)


def _patches(x, weight, bias):
    return patchify_linear(x, weight, bias)


def _time(fn, *args) -> float:
    fn(*args)  # cuDNN's benchmark and torch.compile pick their kernels before the graph capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(lambda: fn(*args), rep=300) * 1000


def _error(result, reference) -> float:
    return float((result.double() - reference).abs().max() / reference.abs().max())


def main() -> None:
    """Time the conv and the patches GEMM, eager and compiled, cuDNN's benchmark off and on, printing one line each."""
    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    torch.manual_seed(0)
    weight = torch.randn(768, 3, 16, 16, device="cuda", dtype=torch.bfloat16) * 0.02
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16) * 0.02
    for batch in (64, 256):
        x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
        reference = F.conv2d(x.double(), weight.double(), bias.double(), stride=16)
        print(f"--- batch {batch}: forward", flush=True)
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for label, fn in (("conv", _conv), ("patches GEMM", _patches)):
                for compiled in (False, True):
                    run = torch.compile(fn) if compiled else fn
                    t = _time(run, x, weight, bias)
                    err = _error(run(x, weight, bias), reference)
                    name = f"{label}{', compiled' if compiled else ''}, cudnn.benchmark={benchmark}"
                    print(f"   {name}: {t:.1f} us  rel_err {err:.1e}", flush=True)
                torch._dynamo.reset()
        if batch != 64:
            continue
        print(f"--- batch {batch}: forward + weight gradient (full fine-tuning's patch embedding)", flush=True)
        grad = torch.randn_like(reference, dtype=torch.bfloat16)
        w = weight.clone().requires_grad_()
        for benchmark in (False, True):
            torch.backends.cudnn.benchmark = benchmark
            for label, fn in (("conv", _conv), ("patches GEMM", _patches)):

                def step(fn=fn, x=x, w=w, grad=grad):
                    return torch.autograd.grad(fn(x, w, bias), w, grad)[0]

                print(f"   {label}, cudnn.benchmark={benchmark}: {_time(step):.1f} us", flush=True)
    torch.backends.cudnn.benchmark = False
