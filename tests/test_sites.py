"""Which modules become SSF sites, with which channel axis, and how patterns narrow them."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from conftest import make_backbone
from ssf_tasks import MultiTaskSSF, PatternMatchError, find_sites
from ssf_tasks.sites import rule_for


def test_vit_base_sites_are_the_papers_placement():
    backbone = timm.create_model("vit_base_patch16_224", num_classes=0)
    model = MultiTaskSSF(backbone)
    expected = ["patch_embed.proj"]
    for i in range(12):
        expected += [f"blocks.{i}.{n}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
    expected.append("norm")
    assert model.site_names == expected
    assert model.ssf_parameters_per_task == 205_824  # the paper's 0.206M


def test_channel_axis_is_chosen_by_layer_type():
    assert rule_for(nn.Linear(4, 5)).channel_axis == -1
    assert rule_for(nn.LayerNorm(4)).channel_axis == -1
    assert rule_for(timm.layers.LayerNorm2d(4)).channel_axis == 1  # a LayerNorm subclass on axis 1
    assert rule_for(nn.Conv2d(4, 8, 3, groups=4)).channel_axis == 1
    assert rule_for(nn.BatchNorm2d(4)).channel_axis == 1
    assert rule_for(nn.GroupNorm(2, 4)).channel_axis == 1
    assert rule_for(timm.layers.RmsNorm(4)).channel_axis == -1
    fused = rule_for(timm.layers.BatchNormAct2d(4))
    assert fused.channel_axis == 1 and fused.norm_forward is not None
    assert rule_for(nn.LayerNorm(4, elementwise_affine=False)) is None
    assert rule_for(timm.layers.StdConv2d(4, 8, 3)) is None  # weight standardisation would undo a folded scale
    assert rule_for(nn.ReLU()) is None


def test_fused_norm_act_gets_ssf_between_norm_and_activation():
    backbone = make_backbone("efficientnet")
    model = MultiTaskSSF(backbone)
    names = model.site_names
    assert "bn1" in names and "bn1.act" not in names
    site = model.backbone.get_submodule("bn1")
    assert isinstance(site.base_layer, timm.layers.BatchNormAct2d)
    model.add_task("t", 2)
    with torch.no_grad():
        site.ssf_scale.fill_(-1.0)  # a negative scale before SiLU differs from one after it
        site.ssf_shift.zero_()
        x = torch.randn(1, site.channels, 4, 4, device=site.ssf_scale.device)
        model.routing.index = 0
        y = site(x)
        model.routing.index = None
        base = site.base_layer
        expected = base.act(-nn.functional.batch_norm(x, base.running_mean, base.running_var, base.weight, base.bias))
    torch.testing.assert_close(y, expected)


def test_include_exclude_patterns():
    backbone = make_backbone("vit")
    all_sites = [s.name for s in find_sites(backbone)]
    qkv = [s.name for s in find_sites(backbone, include=["qkv"])]
    assert qkv and all(n.endswith("attn.qkv") for n in qkv)
    no_mlp = [s.name for s in find_sites(backbone, exclude=["blocks.*.mlp.*"])]
    assert no_mlp == [n for n in all_sites if ".mlp." not in n]
    with pytest.raises(PatternMatchError, match=r"include pattern 'nope' matches no site; sites are: patch_embed.proj"):
        find_sites(backbone, include=["nope"])
    with pytest.raises(PatternMatchError, match="exclude pattern"):
        MultiTaskSSF(backbone, exclude=["nope"])
