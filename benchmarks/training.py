"""The training step: one AdamW step (bf16 autocast) of SSF against the other ways to adapt a frozen backbone.

Why these variants: full fine-tuning is what SSF replaces; a linear probe is the cheapest adaptation; PEFT's LoRA
r=8 is the usual parameter-efficient one; the frozen-backbone floor (backward through every block, no weight
gradients, no SSF) is a step no SSF step can beat. The SSF rows with one kernel left to torch.compile show what
each of the fused path's kernels gains, and the rows with a compiler setting show what the setting changes. Every
variant is built (and compiled) first, then all are timed in alternation, so a slow spell of the machine lands on
all of them; each fast SSF step is checked against the eager path (logits and every gradient) before it is timed.
Weights are random (speed does not depend on their values). Numbers: BENCHMARKS.md.
"""

from __future__ import annotations

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

from ssf_tasks.adapters import restore_timm_classes
from ssf_tasks.adapters.vit_attention import MixedTaskAttention
from ssf_tasks.adapters.vit_block import FusedBlockChain
from ssf_tasks.adapters.vit_mlp import FusedGeluMlp
from ssf_tasks.model import MultiTaskSSF

from .common import Row, has_patchify_stem, print_profile, rel_error, report, samples, with_patches_gemm

__all__ = ["bench_training", "ssf_training_variant"]


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
                    report(rows, {**row, "failed": f"{type(failure).__name__}: {failure}"[:300]})
                    continue
                if profile:
                    print_profile(step, label)
                built.append(({**row, "peak_gib": peak, **extra}, step))
                # Building (compiling) takes about a minute per variant: show progress, so a run cut short by a
                # time limit still tells which variants built and their memory.
                print(
                    json.dumps({"built": label, "peak_gib": peak, **extra, "seconds": time.time() - started}),
                    flush=True,
                )
        timings: list[list[float]] = [[] for _ in built]
        for _ in range(rounds):
            for times, (_, step) in zip(timings, built, strict=True):
                times += samples(step, warmup=1, repeats=max(1, repeats // rounds))
    for times, (row, _) in zip(timings, built, strict=True):
        report(rows, {**row, "ms": statistics.median(times)})
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
    sums are left to torch.compile (see ``ssf_tasks.kernels.gelu_backward``): what the kernel gains.
    ``fused_blocks=False`` gives ``blocks`` back ``nn.Sequential``, so ``proj``'s and ``fc2``'s sums and the
    LayerNorm sites' are left to torch.compile (see ``ssf_tasks.adapters.vit_block`` and
    ``ssf_tasks.kernels.residual_norm``). ``fused_qkv=False`` turns off attention's one-op ``qkv``, so the copy of
    dq/dk/dv and ``qkv``'s sums are left to torch.compile (see ``ssf_tasks.kernels.qkv_backward``).
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
    return max(rel_error(a, b) for a, b in zip(result, reference, strict=True))
