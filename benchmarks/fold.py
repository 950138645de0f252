"""The folded task model: one task's γ/β folded into the backbone's weights gives a plain timm network.

Why: an exported task (``ssf-tasks export``) must cost nothing over the plain model it came from, or folding would
not be worth it. Its latency is timed beside the plain timm model's (same architecture, same head size), and its
output is checked against the SSF model's (fp32, eager) first. Numbers: BENCHMARKS.md.
"""

from __future__ import annotations

import timm
import torch

from ssf_tasks.model import MultiTaskSSF

from .common import Row, compile_fresh, rel_error, report, timed

__all__ = ["bench_fold"]


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
    error = rel_error(folded(images), model(images, "task")[:, :classes])  # fp32, eager
    plain = timm.create_model(model_name, num_classes=classes).cuda().eval().to(torch.bfloat16)
    folded = folded.to(torch.bfloat16)
    images = images.to(torch.bfloat16)
    for label, net in (("plain timm model", plain), ("folded ssf-tasks export", folded)):
        compiled = compile_fresh(net, None)
        ms = timed(lambda: compiled(images), warmup=warmup, repeats=repeats)
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
        report(rows, row)
    torch._dynamo.reset()
    return rows
