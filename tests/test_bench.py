"""The benchmarks' own set-up, checked on CPU (the timings themselves need a GPU: see BENCHMARKS.md)."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from ssf_tasks.ssf import SSFLayer
from ssf_tasks_bench.common import has_patchify_stem, with_patches_gemm
from ssf_tasks_bench.training import _ssf_training_error, ssf_training_variant

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # the bench's autocast is CUDA's


def test_ssf_training_step_optimises_the_parameters_the_model_uses():
    forward, params, model = ssf_training_variant("test_vit", 3, fast=False, device="cpu")
    F.cross_entropy(forward(torch.randn(2, 3, 160, 160))[:, :3], torch.tensor([0, 2])).backward()

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in trainable}
    assert len(params) == 2 * len(model.sites) - sum(s.ssf_shift is None for s in model.sites) + 2
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert not any(p.requires_grad for n, p in model.backbone.named_parameters() if "ssf_" not in n)


def test_training_error_compares_the_fused_path_with_the_eager_path(monkeypatch):
    forward, params, model = ssf_training_variant("test_vit", 3, fast=True, device="cpu")
    settings = [True] * len(model.sites)
    settings[0] = None  # a mixed setting, to see that each site gets its own back
    for site, setting in zip(model.sites, settings, strict=True):
        site.fast_path = setting
    images, labels = torch.randn(2, 3, 160, 160), torch.tensor([0, 2])

    assert _ssf_training_error(forward, params, model, images, labels, 3) < 1e-4
    assert [site.fast_path for site in model.sites] == settings
    assert all(p.grad is None for p in params)
    # A wrong step is seen: a wrong result, and a wrong fused path (so the reference must be the eager path).
    assert _ssf_training_error(lambda x: forward(x) * 1.01, params, model, images, labels, 3) > 5e-3
    fused = SSFLayer._fast_forward

    def one_percent_off(self, x, *args, **kwargs):
        out = fused(self, x, *args, **kwargs)
        return tuple(t * 1.01 for t in out) if isinstance(out, tuple) else out * 1.01  # qkv gives q, k, v

    monkeypatch.setattr(SSFLayer, "_fast_forward", one_percent_off)
    assert _ssf_training_error(forward, params, model, images, labels, 3) > 5e-3


def test_ablation_variant_gives_the_mlps_timm_class_back():
    from timm.layers import Mlp

    from ssf_tasks.adapters.vit_mlp import FusedGeluMlp

    for fused, expected in ((True, FusedGeluMlp), (False, Mlp)):
        _, _, model = ssf_training_variant("test_vit", 3, fast=True, device="cpu", fused_mlp=fused)
        assert {type(block.mlp) for block in model.backbone.blocks} == {expected}


def test_ablation_variant_gives_the_blocks_timm_class_back():
    from torch import nn

    from ssf_tasks.adapters.vit_block import FusedBlockChain

    for fused, expected in ((True, FusedBlockChain), (False, nn.Sequential)):
        _, _, model = ssf_training_variant("test_vit", 3, fast=True, device="cpu", fused_blocks=fused)
        assert type(model.backbone.blocks) is expected


def test_ablation_variant_turns_the_one_op_qkv_off():
    from ssf_tasks.adapters.vit_attention import MixedTaskAttention

    for fused in (True, False):
        _, _, model = ssf_training_variant("test_vit", 3, fast=True, device="cpu", fused_qkv=fused)
        attention = [m for m in model.backbone.modules() if isinstance(m, MixedTaskAttention)]
        assert len(attention) == len(model.backbone.blocks)
        assert {m.fused_qkv for m in attention} == {fused}


def test_patches_gemm_baseline_is_the_same_network():
    import copy

    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3).eval()
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        expected = model(images)
        gemm = with_patches_gemm(copy.deepcopy(model))
        torch.testing.assert_close(gemm(images), expected, rtol=1e-5, atol=1e-5)
    assert gemm.state_dict().keys() == model.state_dict().keys()
    assert type(gemm.patch_embed.proj) is not torch.nn.Conv2d  # it runs patchify_linear
    # overlapping patches, and models without a patch embedding (their bench rows are left out)
    model.patch_embed.proj = torch.nn.Conv2d(3, 8, 16, stride=8)
    for other in (model, timm.create_model("test_resnet"), timm.create_model("test_convnext")):
        assert not has_patchify_stem(other)
        with pytest.raises(ValueError, match="no patchify conv"):
            with_patches_gemm(other)
