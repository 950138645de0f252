"""GPU benchmarks: mixed-task inference, task scale, training step, folded-model latency.

Every variant runs side by side in one process on one card; each fast path is checked against its eager
reference (relative error printed next to its time) before it is timed, and ``torch._dynamo.reset()`` runs
between compiled variants so that no variant reuses another's graph. Weights are random (speed does not
depend on their values). Run ``python -m ssf_tasks.bench --help`` or ``ssf-tasks bench --help``.

This module needs only torch and timm (plus peft for the LoRA rows), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
from torch import nn
from torch.nn import functional as F

from .fold import restore_timm_classes
from .fused_block import FusedBlockChain
from .fused_mlp import FusedGeluMlp
from .graphed import GraphedForward
from .mixed_attention import MixedTaskAttention
from .model import MultiTaskSSF
from .ssf import _is_patchify, patchify_linear

__all__ = [
    "bench_fold",
    "bench_inference",
    "bench_training",
    "has_patchify_stem",
    "main",
    "ssf_training_variant",
    "with_patches_gemm",
]

Row = dict[str, Any]


def _timed(fn: Callable[[], Any], *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs, timed with CUDA events after ``warmup`` runs."""
    return statistics.median(_samples(fn, warmup=warmup, repeats=repeats))


def _samples(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs of ``fn`` (CUDA events, synchronised), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def _print_profile(fn: Callable[[], Any], label: str = "") -> None:
    """The top CUDA kernels of three calls of ``fn``: where the time of a variant goes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # CUDA activity also records the host's launch calls (runtime and driver API); only device events are kernels.
    kernels = [a for a in averages if a.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(a.self_device_time_total for a in kernels) / 3000.0
    launches = sum(a.count for a in kernels) / 3
    # Kernel time below the wall-clock time of a call means the GPU waited (for launches from the host).
    print(f"--- profile: {label}: {kernel_ms:.2f} ms of kernels and {launches:.0f} kernels per call")
    print(averages.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))


def _graph_breaks() -> int:
    return int(sum(torch._dynamo.utils.counters["graph_break"].values()))


def _rel_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    result, reference = result.float(), reference.float()
    finite = torch.isfinite(reference)
    diff = (result[finite] - reference[finite]).abs().max()
    return float(diff / reference[finite].abs().max().clamp_min(1e-12))


def _compile(module: nn.Module | Callable, mode: str | None) -> Callable:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return torch.compile(module, mode=mode, dynamic=False)


def _report(rows: list[Row], row: Row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


class _PatchesGemmConv(nn.Conv2d):
    """A patchify ``nn.Conv2d`` run as ssf-tasks runs it, one GEMM (``patchify_linear``); same parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patchify_linear(x, self.weight, self.bias)


def has_patchify_stem(model: nn.Module) -> bool:
    """The model embeds patches with a conv that ssf-tasks runs as one GEMM on CUDA (ViT, DeiT, ...)."""
    conv = getattr(getattr(model, "patch_embed", None), "proj", None)
    return type(conv) is nn.Conv2d and _is_patchify(conv)


def with_patches_gemm(model: nn.Module) -> nn.Module:
    """``model`` with its ViT patch embedding run as one GEMM, as ssf-tasks runs it on CUDA: the baselines'
    rows "(patch embedding as one GEMM)" show how much of a ratio that alone moves (cuDNN is slow at it)."""
    if not has_patchify_stem(model):
        raise ValueError(f"no patchify conv at patch_embed.proj: {getattr(model, 'patch_embed', None)}")
    model.patch_embed.proj.__class__ = _PatchesGemmConv
    return model


def _ssf_model(model_name: str, num_tasks: int, classes: int, dtype: torch.dtype) -> MultiTaskSSF:
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

            def report(variant: str, ms: float, mode_used: str | None = mode, **fields: Any) -> None:
                _report(rows, {**base, "mode": mode_used or "default", "variant": variant, "ms": ms, **fields})

            report("plain backbone, eager", _timed(lambda: plain(images), warmup=warmup, repeats=repeats))
            compiled_plain = _compile(plain, mode)
            plain_reference = plain(images)
            error = _rel_error(compiled_plain(images).clone(), plain_reference)
            report(
                "plain backbone, compiled",
                _timed(lambda: compiled_plain(images), warmup=warmup, repeats=repeats),
                rel_err=error,
            )
            if stem_gemm and has_patchify_stem(plain):
                torch._dynamo.reset()
                plain_gemm = _compile(with_patches_gemm(copy.deepcopy(plain)), mode)
                report(
                    "plain backbone, compiled (patch embedding as one GEMM)",
                    _timed(lambda: plain_gemm(images), warmup=warmup, repeats=repeats),
                    rel_err=_rel_error(plain_gemm(images).clone(), plain_reference),
                )
                if profile:
                    _print_profile(
                        lambda: plain_gemm(images), f"plain compiled, patch embedding as one GEMM, batch {batch}"
                    )
                plain_gemm = None
                torch._dynamo.reset()

            reference = model(images, tasks)
            report(
                "ssf-tasks mixed, eager", _timed(lambda: model(images, tasks), warmup=warmup, repeats=repeats), **extra
            )
            for suffix, off in _KERNELS_OFF.items():
                _set_mixed_kernels(model, off)
                compiled_model = _compile(model, mode)
                error = _rel_error(compiled_model(images, tasks).clone(), reference)
                breaks = _graph_breaks()
                ms = _timed(lambda: compiled_model(images, tasks), warmup=warmup, repeats=repeats)
                if profile:
                    _print_profile(lambda: compiled_model(images, tasks), f"ssf-tasks compiled{suffix}, batch {batch}")
                report("ssf-tasks mixed, compiled" + suffix, ms, rel_err=error, graph_breaks=breaks, **extra)
            _set_mixed_kernels(model, ())
            if profile:
                _print_profile(lambda: compiled_plain(images), f"plain compiled, batch {batch}")
            torch._dynamo.reset()

            # Side by side: every variant captured whole, replayed in alternation (at batch 256 a drift of the
            # machine between the rows above moves the ratio by a percent or more).
            ssf_variants = ("",) if batch <= 8 else ("", ", without the GELU kernel")
            rows_of_graphs = _graphed_latency(
                plain, model, images, tasks, plain_reference, reference, repeats, stem_gemm, ssf_variants
            )
            for variant, (ms, error) in rows_of_graphs.items():
                report(variant, ms, "default + GraphedForward", rel_err=error)

            if loop and num_tasks > 1 and batch > 1:

                def run_loop():
                    out = torch.empty(batch, plain.num_features, device="cuda", dtype=dtype)
                    for task in tasks.unique().tolist():
                        rows_of_task = (tasks == task).nonzero().squeeze(1)
                        out[rows_of_task] = model.forward_features(images[rows_of_task], f"t{task}")
                    return out

                error = _rel_error(run_loop(), model.forward_features(images, tasks))
                loop_ms = _timed(run_loop, warmup=2, repeats=max(3, repeats // 4))
                report("loop over tasks, eager", loop_ms, None, rel_err=error)
        model = None  # free this task count's tables before the next one is built
        torch.cuda.empty_cache()
    if peft and 64 in task_counts:
        rows += _bench_peft_inference(plain, batch_sizes, warmup, repeats)
    for row in rows:
        row["img_per_s"] = row["batch"] * 1000.0 / row["ms"]
    return rows


# Compiled ssf-tasks rows: which mixed-batch kernels each turns off (``_set_mixed_kernels``), by row suffix.
_KERNELS_OFF = {"": (), ", without the GELU kernel": ("gelu",), ", without the attention kernel": ("attention",)}


def _set_mixed_kernels(model: MultiTaskSSF, off: tuple[str, ...]) -> None:
    model.set_mixed_attention("attention" not in off)
    model.set_mixed_gelu("gelu" not in off)


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
        errors[name] = _rel_error(graphs[name](*inputs).clone(), expected)
    _set_mixed_kernels(model, ())
    samples: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graphed in graphs.items():
            samples[name] += _samples(graphed.graph.replay, warmup=3, repeats=repeats)
    torch._dynamo.reset()
    return {name: (statistics.median(times), errors[name]) for name, times in samples.items()}


def _bench_peft_inference(plain: nn.Module, batch_sizes, warmup, repeats) -> list[Row]:
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
        ms = _timed(lambda: model(images, adapter_names=names), warmup=2, repeats=max(3, repeats // 4))
        _report(
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


def bench_training(
    model_name: str = "vit_base_patch16_224",
    batch: int = 64,
    classes: int = 10,
    compiled_variants: tuple[bool, ...] = (True, False),
    peft: bool = True,
    warmup: int = 5,
    repeats: int = 20,
    profile: bool = False,
    only: tuple[str, ...] = (),
    memory_budgets: tuple[float, ...] = (0.5, 0.2),
    rounds: int = 5,
    compile_mode: str | None = None,
) -> list[Row]:
    """One AdamW step (bf16 autocast): full fine-tuning, linear probe, LoRA r=8, ssf-tasks SSF.

    ``compile_mode`` is given to ``torch.compile`` for every compiled variant alike (``reduce-overhead``: the
    forward and backward replayed as CUDA graphs, which removes the host's launch time from every variant).
    """
    rows: list[Row] = []
    size = timm.get_pretrained_cfg(model_name).input_size[1]
    images = torch.randn(batch, 3, size, size, device="cuda")
    labels = torch.randint(0, classes, (batch,), device="cuda")

    def full_ft():
        model = timm.create_model(model_name, num_classes=classes).cuda().train()
        return (lambda x: model(x)), list(model.parameters()), model

    def full_ft_patches_gemm():
        model = with_patches_gemm(timm.create_model(model_name, num_classes=classes).cuda().train())
        return (lambda x: model(x)), list(model.parameters()), model

    def linear_probe():
        backbone = timm.create_model(model_name, num_classes=0).cuda().eval().requires_grad_(False)
        head = nn.Linear(backbone.num_features, classes).cuda()

        def forward(x):
            with torch.no_grad():
                features = backbone(x)
            return head(features)

        return forward, list(head.parameters()), nn.ModuleList([backbone, head])

    def frozen_floor():
        # Every weight frozen but the position embedding (and the head): backward still runs through every
        # block, as SSF's must, but computes no weight gradients and no SSF at all. No SSF step can be cheaper.
        # Its patch embedding runs as the SSF model's does (one GEMM).
        model = timm.create_model(model_name, num_classes=classes).cuda().train().requires_grad_(False)
        model = with_patches_gemm(model) if has_patchify_stem(model) else model
        params = [model.pos_embed, *model.get_classifier().parameters()]
        for param in params:
            param.requires_grad_(True)
        return (lambda x: model(x)), params, model

    def lora():
        from peft import LoraConfig, get_peft_model

        model = timm.create_model(model_name, num_classes=classes).cuda()
        model = get_peft_model(
            model, LoraConfig(r=8, target_modules=["qkv", "proj", "fc1", "fc2"], modules_to_save=["head"])
        )
        model.train()
        return (lambda x: model(x)), [p for p in model.parameters() if p.requires_grad], model

    def ssf(fast: bool, **ablation: bool):
        return lambda: ssf_training_variant(model_name, classes, fast=fast, **ablation)

    with torch.device("meta"):  # the layout only: no weights allocated or initialised
        patchify_stem = has_patchify_stem(timm.create_model(model_name))
    variants: list[tuple[str, Callable]] = [
        ("full fine-tuning", full_ft),
        *([(_FULL_PATCHES_GEMM, full_ft_patches_gemm)] if patchify_stem else []),
        ("linear probe", linear_probe),
        ("frozen-backbone floor (backward through every block, no weight gradients, no SSF)", frozen_floor),
    ]
    if peft:
        try:
            import peft as _  # noqa: F401

            variants.append(("PEFT LoRA r=8 (qkv, proj, fc1, fc2) + head", lora))
        except ImportError:
            print("peft not installed: LoRA row skipped", file=sys.stderr)
    variants += [
        ("ssf-tasks SSF + head (fused path)", ssf(True)),
        ("ssf-tasks SSF + head (fused path, fc1's sums left to torch.compile)", ssf(True, fused_mlp=False)),
        ("ssf-tasks SSF + head (fused path, qkv's sums left to torch.compile)", ssf(True, fused_qkv=False)),
        (
            "ssf-tasks SSF + head (fused path, residual-stream sums left to torch.compile)",
            ssf(True, fused_blocks=False),
        ),
        ("ssf-tasks SSF + head (eager path)", ssf(False)),
    ]
    # Compiled variants only, each with a compiler setting of its own: torch.compile's activation-memory budget
    # (the partitioner recomputes cheap ops instead of saving them); inductor's combo kernels (independent small
    # kernels, such as the fused path's per-site folds, launched as one) and its C++ wrapper (the generated code
    # that launches the kernels in C++, not Python: less host time per launch), both tried on both sides. With
    # ``only``, these are taken when an entry names their setting ("budget=0.2", "combo_kernels", "cpp_wrapper");
    # without it, the budgets are, and the inductor settings are not (four more variants to compile).
    patched: list[tuple[str, str, Callable, dict, dict]] = [
        (
            "ssf-tasks SSF + head (fused path, {})",
            f"activation_memory_budget={b}",
            ssf(True),
            {"activation_memory_budget": b},
            {},
        )
        for b in memory_budgets
    ]
    asked_for = []
    for setting in ("combo_kernels", "cpp_wrapper"):
        asked_for += [
            ("full fine-tuning ({})", f"inductor {setting}", full_ft, {}, {setting: True}),
            ("ssf-tasks SSF + head (fused path, {})", f"inductor {setting}", ssf(True), {}, {setting: True}),
        ]
    if only:
        variants = [(label, make) for label, make in variants if any(o in label for o in only)]
        patched = [variant for variant in patched + asked_for if any(o in variant[1] for o in only)]
    settings = [(label.format(setting), make, f, i) for label, setting, make, f, i in patched]
    # Every variant is built, compiled, warmed up and measured for memory first; then all are timed in
    # alternation (``rounds`` passes), so that a slow spell of the machine does not land on one variant only.
    built: list[tuple[Row, Callable[[], Any]]] = []
    started = time.time()
    with torch._dynamo.config.patch(cache_size_limit=64):
        for compiled in compiled_variants:
            for label, make, functorch_patch, inductor_patch in [(label, make, {}, {}) for label, make in variants] + (
                settings if compiled else []
            ):
                row = {"bench": "training", "model": model_name, "batch": batch, "compiled": compiled, "variant": label}
                if compiled:
                    row["mode"] = compile_mode or "default"
                try:
                    with functorch_config.patch(**functorch_patch), inductor_config.patch(**inductor_patch):
                        step, peak, extra = _build_training_step(
                            make, compile_mode if compiled else False, images, labels, classes, warmup
                        )
                except Exception as failure:  # one variant failing must not lose the others
                    _report(rows, {**row, "failed": f"{type(failure).__name__}: {failure}"[:300]})
                    continue
                if profile:
                    _print_profile(step, label)
                built.append(({**row, "peak_gib": peak, **extra}, step))
                # Building (compiling) takes about a minute per variant: show progress, so a run cut short by a
                # time limit still tells which variants built and their memory.
                print(
                    json.dumps({"built": label, "peak_gib": peak, **extra, "seconds": time.time() - started}),
                    flush=True,
                )
        samples: list[list[float]] = [[] for _ in built]
        for _ in range(rounds):
            for times, (_, step) in zip(samples, built, strict=True):
                times += _samples(step, warmup=1, repeats=max(1, repeats // rounds))
    for times, (row, _) in zip(samples, built, strict=True):
        _report(rows, {**row, "ms": statistics.median(times)})
    for compiled in compiled_variants:
        group = [r for r in rows if r["compiled"] == compiled and "ms" in r]
        full = next((r for r in group if r["variant"] == "full fine-tuning"), None)
        same_stem = next((r for r in group if r["variant"] == _FULL_PATCHES_GEMM), None)
        for row in group if same_stem else ():
            row["time_vs_full_patches_gemm"] = row["ms"] / same_stem["ms"]
        for row in group if full else ():
            row["time_vs_full"] = row["ms"] / full["ms"]
            # Under CUDA graphs the graphs' private pools are allocated before the peak is reset: not comparable.
            if not (compiled and compile_mode == "reduce-overhead"):
                row["memory_vs_full"] = row["peak_gib"] / full["peak_gib"]
    return rows


# Full fine-tuning with its patch embedding run as ssf-tasks runs it on CUDA (one GEMM, not cuDNN's conv): the
# SSF step against it shows what the rest of the step gains, the patch embedding's speed-up left out.
_FULL_PATCHES_GEMM = "full fine-tuning (patch embedding as one GEMM)"


def ssf_training_variant(
    model_name: str,
    classes: int,
    *,
    fast: bool,
    device: str = "cuda",
    fused_mlp: bool = True,
    fused_blocks: bool = True,
    fused_qkv: bool = True,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[nn.Parameter], MultiTaskSSF]:
    """The SSF training step's model: ``(forward, parameters to optimise, model)``.

    The model holds one task, so its trainable parameters are exactly that task's γ/β rows and head, as
    ``isolate_tasks`` gives the trainer. (Entering ``isolate_tasks`` by hand here would be wrong: its context
    object, once garbage, restores the full tables at once, and the optimiser would hold tables the model no
    longer uses.) ``fused_mlp=False`` gives the MLPs timm's class back, so ``fc1``'s GELU backward and column
    sums are left to torch.compile (see ``ssf_tasks.fused_mlp``): what the kernel gains. ``fused_blocks=False``
    gives ``blocks`` back ``nn.Sequential``, so ``proj``'s and ``fc2``'s sums and the LayerNorm sites' are
    left to torch.compile (see ``ssf_tasks.fused_block``). ``fused_qkv=False`` turns off attention's one-op
    ``qkv``, so the copy of dq/dk/dv and ``qkv``'s sums are left to torch.compile (see ``ssf_tasks.fused_qkv``).
    """
    model = MultiTaskSSF(timm.create_model(model_name, num_classes=0).to(device))
    if not fused_mlp:
        restore_timm_classes(model.backbone, (FusedGeluMlp,))
    if not fused_blocks:
        restore_timm_classes(model.backbone, (FusedBlockChain,))
    for module in model.backbone.modules() if not fused_qkv else ():
        if isinstance(module, MixedTaskAttention):
            module.fused_qkv = False
    model.add_task("task", classes)
    model.set_fast_path(None if fast else False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return (lambda x: model(x, "task")), params, model


def _build_training_step(make, mode, images, labels, classes, warmup) -> tuple[Callable[[], Any], float, Row]:
    """Build one variant's AdamW step, warm it up (compiling it) and measure its own peak memory in GiB.

    ``mode``: False for eager, else the ``torch.compile`` mode (None for the default mode). The extra row
    fields hold an SSF fast path's relative error against the eager path.
    """
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()  # the variants built before this one stay alive
    forward, params, holder = make()  # the forward's closure keeps the variant's modules alive
    if mode is not False:
        # A fresh code object per variant: dynamo caches graphs on the code object, and variants built by one
        # factory (the SSF ones differ only in the partitioner's memory budget) would otherwise share a graph.
        code = forward.__code__.replace()
        forward = types.FunctionType(
            code, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__
        )
        forward = torch.compile(forward, dynamic=False, mode=mode)
    extra: Row = {}
    if isinstance(holder, MultiTaskSSF) and (mode is not False or holder.sites[0].fast_path is not False):
        extra["rel_err"] = _ssf_training_error(forward, params, holder, images, labels, classes)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward(images)
        loss = F.cross_entropy(logits.float()[:, :classes], labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step, (torch.cuda.max_memory_allocated() - baseline) / 2**30, extra


def _ssf_training_error(forward, params, model: MultiTaskSSF, images, labels, classes) -> float:
    """A fast SSF step's largest relative error, over its logits and every gradient, against the eager path.

    A timing says nothing unless the fast step computes the same thing: the fused path rewrites every Linear's
    backward, and the compiled graph may reorder bf16 arithmetic. The model's settings and gradients are left as
    they were found (no gradients), whatever happens.
    """

    def logits_and_gradients(fn: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = fn(images)
            F.cross_entropy(logits.float()[:, :classes], labels).backward()
            # Copies: under CUDA graphs these tensors live in the graphs' memory, which the next replay reuses.
            return [logits.detach().float().clone(), *(p.grad.float().clone() for p in params)]
        finally:
            for p in params:
                p.grad = None

    settings = [site.fast_path for site in model.sites]
    for p in params:
        p.grad = None
    try:
        model.set_fast_path(False)
        reference = logits_and_gradients(lambda x: model(x, "task"))
    finally:
        for site, setting in zip(model.sites, settings, strict=True):
            site.fast_path = setting
    result = logits_and_gradients(forward)
    return max(_rel_error(a, b) for a, b in zip(result, reference, strict=True))


@torch.inference_mode()
def bench_fold(
    model_name: str = "vit_base_patch16_224", batch: int = 256, classes: int = 10, warmup: int = 5, repeats: int = 20
) -> list[Row]:
    """The folded per-task model is the plain network: same latency as the backbone with a head."""
    rows: list[Row] = []
    model = MultiTaskSSF(timm.create_model(model_name, num_classes=0).cuda().eval(), sigma=0.05)
    model.add_task("task", classes)
    size = model.backbone.pretrained_cfg["input_size"][1]
    images = torch.randn(batch, 3, size, size, device="cuda")
    folded = model.fold("task")
    error = _rel_error(folded(images), model(images, "task")[:, :classes])  # fp32, eager
    plain = timm.create_model(model_name, num_classes=classes).cuda().eval().to(torch.bfloat16)
    folded = folded.to(torch.bfloat16)
    images = images.to(torch.bfloat16)
    for label, net in (("plain timm model", plain), ("folded ssf-tasks export", folded)):
        compiled = _compile(net, None)
        ms = _timed(lambda: compiled(images), warmup=warmup, repeats=repeats)
        row = {
            "bench": "fold",
            "model": model_name,
            "batch": batch,
            "variant": label + ", compiled",
            "ms": ms,
            "img_per_s": batch * 1000.0 / ms,
        }
        if label.startswith("folded"):
            row["fp32_rel_err_vs_ssf"] = error
        _report(rows, row)
    torch._dynamo.reset()
    return rows


def environment() -> Row:
    """The card and software versions a set of numbers was measured with."""
    row: Row = {"torch": torch.__version__, "timm": timm.__version__}
    if torch.cuda.is_available():
        row["card"] = torch.cuda.get_device_name()
    try:
        import peft

        row["peft"] = peft.__version__
    except ImportError:
        pass
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ssf-tasks bench", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="+", choices=["inference", "scale", "training", "fold"])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write all rows as JSON to this file")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of each variant")
    parser.add_argument("--only", nargs="*", default=[], help="training variants whose label contains one of these")
    parser.add_argument("--eager-only", action="store_true", help="training: skip torch.compile")
    parser.add_argument("--compiled-only", action="store_true", help="training: skip eager")
    parser.add_argument(
        "--mode", default=None, help="torch.compile mode: inference, every batch size; training, every compiled variant"
    )
    parser.add_argument("--batches", type=int, nargs="*", default=[256, 8, 1], help="inference batch sizes")
    parser.add_argument("--tasks", type=int, nargs="*", default=[1, 1000, 10000], help="scale: tasks resident")
    parser.add_argument("--no-loop", action="store_true", help="inference: skip the loop-over-tasks baseline")
    parser.add_argument(
        "--rounds", type=int, default=5, help="training: timing passes over all variants, in alternation"
    )
    parser.add_argument(
        "--cudnn-benchmark", action="store_true", help="let cuDNN time its kernels for each conv shape (every variant)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not torch.cuda.is_available():
        print("error: the benchmarks need a CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    started = time.time()
    env = environment()
    print(json.dumps(env), flush=True)
    rows: list[Row] = []
    for which in args.which:
        if which == "inference":
            rows += bench_inference(
                args.model,
                tuple(args.batches),
                peft=not args.no_peft,
                loop=not args.no_loop,
                repeats=args.repeats,
                compile_mode=args.mode,
                profile=args.profile,
            )
        elif which == "scale":
            rows += bench_inference(
                args.model,
                batch_sizes=(256,),
                task_counts=tuple(args.tasks),
                peft=False,
                loop=False,
                repeats=args.repeats,
            )
        elif which == "training":
            modes = (False,) if args.eager_only else (True,) if args.compiled_only else (True, False)
            rows += bench_training(
                args.model,
                peft=not args.no_peft,
                repeats=args.repeats,
                profile=args.profile,
                only=tuple(args.only),
                compiled_variants=modes,
                compile_mode=args.mode,
                rounds=args.rounds,
            )
        elif which == "fold":
            rows += bench_fold(args.model, repeats=args.repeats)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"environment": env, "seconds": time.time() - started, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
