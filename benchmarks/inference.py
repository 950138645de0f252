"""Mixed-task inference: the forward of a batch whose samples belong to different tasks, against the plain backbone.

Why these baselines: the plain compiled backbone is the floor (a batch of one task, no SSF at all); a loop over the
batch's tasks is what a one-model-per-task server does; PEFT's LoRA with ``adapter_names`` is the nearest existing
mixed-adapter batch. Batches of 8 or fewer are latency-bound (host launches dominate), so every batch size also runs
as whole-forward CUDA graphs, plain and ssf-tasks replayed in alternation. ``bench_scale`` keeps the batch and grows
the number of tasks resident on the card. Weights are random (speed does not depend on their values).
Numbers: BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import statistics
import sys
from typing import Any

import timm
import torch
from torch import nn

from ssf_tasks.adapters import ADAPTERS
from ssf_tasks.graphed import GraphedForward
from ssf_tasks.model import MultiTaskSSF

from .common import (
    Row,
    compile_fresh,
    graph_breaks,
    has_patchify_stem,
    print_profile,
    rel_error,
    report,
    samples,
    timed,
    with_patches_gemm,
)

__all__ = ["bench_inference", "bench_scale"]


def _ssf_model(model_name: str, num_tasks: int, classes: int, dtype: torch.dtype) -> MultiTaskSSF:
    """``num_tasks`` tasks of ``classes`` classes on a random ``model_name``, in ``dtype``, for inference."""
    backbone = timm.create_model(model_name, num_classes=0).cuda().eval()
    model = MultiTaskSSF(backbone)
    for start in range(0, num_tasks, 1000):  # in chunks: one table copy per chunk
        model.add_tasks({f"t{i}": classes for i in range(start, min(start + 1000, num_tasks))})
    return model.to(dtype).eval()


@torch.inference_mode()
def bench_inference(
    model_name: str = "vit_base_patch16_224",
    batch_sizes: tuple[int, ...] = (256, 8, 1),
    task_counts: tuple[int, ...] = (64,),
    classes: int = 10,
    peft: bool = True,
    loop: bool = True,
    warmup: int = 5,
    repeats: int = 20,
    compile_mode: str | None = None,
    profile: bool = False,
    stem_gemm: bool = True,
) -> list[Row]:
    """Throughput of the plain backbone against mixed-task SSF batches (and a per-task loop and PEFT LoRA).

    Every batch size also runs as whole-forward CUDA graphs (``GraphedForward``), plain and ssf-tasks timed in
    alternation so that drifts of the machine hit all alike (batches of 8 or fewer are latency-bound: only the
    graphs show their speed; above 8 the graphs add ssf-tasks without the GELU kernel). ``stem_gemm`` adds the
    compiled plain backbone with its patch embedding run as ssf-tasks runs it (``with_patches_gemm``).
    """
    dtype = torch.bfloat16
    rows: list[Row] = []
    plain = timm.create_model(model_name, num_classes=0).cuda().eval().to(dtype)
    size = plain.pretrained_cfg["input_size"][1]
    for num_tasks in task_counts:
        model = _ssf_model(model_name, num_tasks, classes, dtype)
        resident_gib = sum(
            p.numel() * p.element_size() for n, p in model.named_parameters() if "ssf_" in n or "head_" in n
        )
        resident_gib /= 2**30
        for batch in batch_sizes:
            generator = torch.Generator(device="cuda").manual_seed(batch)
            images = torch.randn(batch, 3, size, size, device="cuda", dtype=dtype, generator=generator)
            tasks = torch.randint(0, num_tasks, (batch,), device="cuda", generator=generator)
            mode = compile_mode or ("reduce-overhead" if batch <= 8 else None)
            base = {"bench": "inference", "model": model_name, "batch": batch, "tasks": num_tasks}
            extra = {"resident_gib": resident_gib}

            def add(variant: str, ms: float, mode_used: str | None = mode, **fields: Any) -> None:
                report(rows, {**base, "mode": mode_used or "default", "variant": variant, "ms": ms, **fields})

            add("plain backbone, eager", timed(lambda: plain(images), warmup=warmup, repeats=repeats))
            compiled_plain = compile_fresh(plain, mode)
            plain_reference = plain(images)
            error = rel_error(compiled_plain(images).clone(), plain_reference)
            add(
                "plain backbone, compiled",
                timed(lambda: compiled_plain(images), warmup=warmup, repeats=repeats),
                rel_err=error,
            )
            if stem_gemm and has_patchify_stem(plain):
                torch._dynamo.reset()
                plain_gemm = compile_fresh(with_patches_gemm(copy.deepcopy(plain)), mode)
                add(
                    "plain backbone, compiled (patch embedding as one GEMM)",
                    timed(lambda: plain_gemm(images), warmup=warmup, repeats=repeats),
                    rel_err=rel_error(plain_gemm(images).clone(), plain_reference),
                )
                if profile:
                    print_profile(
                        lambda: plain_gemm(images), f"plain compiled, patch embedding as one GEMM, batch {batch}"
                    )
                plain_gemm = None
                torch._dynamo.reset()

            reference = model(images, tasks)
            add("ssf-tasks mixed, eager", timed(lambda: model(images, tasks), warmup=warmup, repeats=repeats), **extra)
            for suffix, off in _KERNELS_OFF.items():
                _set_mixed_kernels(model, off)
                compiled_model = compile_fresh(model, mode)
                error = rel_error(compiled_model(images, tasks).clone(), reference)
                breaks = graph_breaks()
                ms = timed(lambda: compiled_model(images, tasks), warmup=warmup, repeats=repeats)
                if profile:
                    print_profile(lambda: compiled_model(images, tasks), f"ssf-tasks compiled{suffix}, batch {batch}")
                add("ssf-tasks mixed, compiled" + suffix, ms, rel_err=error, graph_breaks=breaks, **extra)
            _set_mixed_kernels(model, ())
            if profile:
                print_profile(lambda: compiled_plain(images), f"plain compiled, batch {batch}")
            torch._dynamo.reset()

            # Side by side: every variant captured whole, replayed in alternation (at batch 256 a drift of the
            # machine between the rows above moves the ratio by a percent or more).
            ssf_variants = ("",) if batch <= 8 else ("", ", without the GELU kernel")
            rows_of_graphs = _graphed_latency(
                plain, model, images, tasks, plain_reference, reference, repeats, stem_gemm, ssf_variants
            )
            for variant, (ms, error) in rows_of_graphs.items():
                add(variant, ms, "default + GraphedForward", rel_err=error)

            if loop and num_tasks > 1 and batch > 1:

                def run_loop():
                    out = torch.empty(batch, plain.num_features, device="cuda", dtype=dtype)
                    for task in tasks.unique().tolist():
                        rows_of_task = (tasks == task).nonzero().squeeze(1)
                        out[rows_of_task] = model.forward_features(images[rows_of_task], f"t{task}")
                    return out

                error = rel_error(run_loop(), model.forward_features(images, tasks))
                loop_ms = timed(run_loop, warmup=2, repeats=max(3, repeats // 4))
                add("loop over tasks, eager", loop_ms, None, rel_err=error)
        model = None  # free this task count's tables before the next one is built
        torch.cuda.empty_cache()
    if peft and 64 in task_counts:
        rows += _bench_peft_inference(plain, batch_sizes, warmup, repeats)
    for row in rows:
        row["img_per_s"] = row["batch"] * 1000.0 / row["ms"]
    return rows


def bench_scale(
    model_name: str = "vit_base_patch16_224",
    task_counts: tuple[int, ...] = (1, 1000, 10000),
    batch: int = 256,
    repeats: int = 20,
) -> list[Row]:
    """A mixed batch with ``task_counts`` tasks resident on the card: the cost of holding many tasks (their γ/β
    tables and heads, reported as ``resident_gib``) and of gathering each sample's rows from larger tables."""
    return bench_inference(
        model_name, batch_sizes=(batch,), task_counts=task_counts, peft=False, loop=False, repeats=repeats
    )


# Compiled ssf-tasks rows: which mixed-batch kernels each turns off (``_set_mixed_kernels``), by row suffix. The
# names are the adapters' (``ssf_tasks.adapters.ADAPTERS``): each row without a kernel shows what that kernel gains.
_KERNELS_OFF = {"": (), ", without the GELU kernel": ("gelu",), ", without the attention kernel": ("attention",)}


def _set_mixed_kernels(model: MultiTaskSSF, off: tuple[str, ...]) -> None:
    """Every adapter's mixed-batch kernel on, but those named in ``off``."""
    for adapter in ADAPTERS:
        if adapter.mixed_kernel:
            model.set_mixed_kernel(adapter.name, adapter.name not in off)


def _graphed_latency(
    plain, model, images, tasks, plain_reference, reference, repeats, stem_gemm=True, ssf_variants=("",), rounds=10
) -> dict:
    """Plain and ssf-tasks forwards (compiled, default mode) each captured whole in a CUDA graph.

    The graphs are replayed in alternation, ``rounds`` times ``repeats`` replays each, and each time is the
    median of all its replays: a slow spell of the machine lands on all. Only the replay is timed (the inputs
    stay in the graphs' buffers). ``stem_gemm`` adds the plain backbone with its patch embedding as one GEMM
    (``with_patches_gemm``); ``ssf_variants`` are suffixes of ``_KERNELS_OFF``: ssf-tasks rows with kernels off.
    """
    variants = {"plain backbone, compiled + CUDA graph": (plain, (images,), plain_reference, None)}
    for suffix in ssf_variants:
        variants["ssf-tasks mixed, compiled + CUDA graph" + suffix] = (model, (images, tasks), reference, suffix)
    if stem_gemm and has_patchify_stem(plain):
        plain_gemm = with_patches_gemm(copy.deepcopy(plain))
        name = "plain backbone (patch embedding as one GEMM), compiled + CUDA graph"
        variants[name] = (plain_gemm, (images,), plain_reference, None)
    graphs, errors = {}, {}
    for name, (module, inputs, expected, suffix) in variants.items():
        if suffix is not None:
            _set_mixed_kernels(model, _KERNELS_OFF[suffix])  # read while compiling and capturing only
        torch._dynamo.reset()
        graphs[name] = GraphedForward(torch.compile(module), *inputs)
        errors[name] = rel_error(graphs[name](*inputs).clone(), expected)
    _set_mixed_kernels(model, ())
    replays: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graphed in graphs.items():
            replays[name] += samples(graphed.graph.replay, warmup=3, repeats=repeats)
    torch._dynamo.reset()
    return {name: (statistics.median(times), errors[name]) for name, times in replays.items()}


def _bench_peft_inference(plain: nn.Module, batch_sizes, warmup, repeats) -> list[Row]:
    """PEFT LoRA r=8 with 64 adapters, each sample of a batch naming its own (``adapter_names``), eager."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        print("peft not installed: LoRA rows skipped", file=sys.stderr)
        return []
    rows: list[Row] = []
    config = LoraConfig(r=8, target_modules=["qkv", "proj", "fc1", "fc2"])
    model = get_peft_model(copy.deepcopy(plain), config, adapter_name="t0")
    for i in range(1, 64):
        model.add_adapter(f"t{i}", config)
    model.eval()
    size = plain.pretrained_cfg["input_size"][1]
    for batch in batch_sizes:
        images = torch.randn(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
        names = [f"t{i % 64}" for i in range(batch)]
        ms = timed(lambda: model(images, adapter_names=names), warmup=2, repeats=max(3, repeats // 4))
        report(
            rows,
            {
                "bench": "inference",
                "model": "peft-lora-r8",
                "batch": batch,
                "tasks": 64,
                "mode": "default",
                "variant": "PEFT LoRA r=8, adapter_names mixed batch, eager",
                "ms": ms,
            },
        )
    return rows
