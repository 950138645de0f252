"""Folding a task gives a plain timm model with timm's own keys and the SSF model's outputs."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from conftest import FAMILIES, device_under_test, make_backbone, make_images
from ssf_tasks import FoldError, MultiTaskSSF, SSFLayer, fold_error


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_model_equals_ssf_model_and_loads_strictly(family):
    name, kwargs, _ = FAMILIES[family]
    model = MultiTaskSSF(make_backbone(family), sigma=0.2)  # far from identity, so folding really matters
    generator = torch.Generator().manual_seed(3)
    model.add_task("a", 4, generator=generator)
    model.add_task("b", 9, generator=generator)
    before = {k: v.clone() for k, v in model.backbone_state_dict().items()}
    images = make_images(family)
    for task in ("a", "b"):
        folded = model.fold(task)
        assert type(folded) is type(model.backbone)
        assert not any(isinstance(m, SSFLayer) for m in folded.modules())
        assert fold_error(model, task, images, folded) <= 1e-5
        fresh = timm.create_model(name, num_classes=model.num_classes(task), **kwargs).to(device_under_test()).eval()
        fresh.load_state_dict(folded.state_dict(), strict=True)
        assert set(fresh.state_dict()) == set(folded.state_dict())  # exactly timm's keys, none added
        with torch.no_grad():
            assert_close(fresh(images), folded(images), rtol=0, atol=0)
    for key, value in model.backbone_state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fold_actually_applies_the_task():
    """A fold that ignored γ/β would still load strictly; its outputs would not match the SSF model."""
    model = MultiTaskSSF(make_backbone("resnet"), sigma=0.3)
    model.add_task("a", 4)
    images = make_images("resnet")
    plain = make_backbone("resnet")
    plain.reset_classifier(4)
    folded = model.fold("a")
    plain.get_classifier().load_state_dict(folded.get_classifier().state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(images), folded(images), atol=1e-3)


def test_non_finite_scale_cannot_be_folded():
    model = MultiTaskSSF(make_backbone("vit"))
    model.add_task("a", 3)
    with torch.no_grad():
        model.backbone.get_submodule("blocks.0.attn.proj").ssf_scale[0, 2] = float("nan")
    with pytest.raises(FoldError, match=r"non-finite γ/β at site 'blocks.0.attn.proj'"):
        model.fold("a")


def test_vit_base_folds_exactly():
    torch.manual_seed(0)
    backbone = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
    model = MultiTaskSSF(backbone, sigma=0.05)
    model.add_task("a", 10)
    images = torch.randn(2, 3, 224, 224)
    folded = model.fold("a")
    assert fold_error(model, "a", images, folded) <= 1e-5
    fresh = timm.create_model("vit_base_patch16_224", num_classes=10)
    fresh.load_state_dict(folded.state_dict(), strict=True)


def test_real_vit_tiny_imagenet_head_reproduces_backbone_predictions(assets):
    """γ=1, β=0 and the ImageNet head, folded, must classify real ImageNet photos like the backbone."""
    weights = load_file(assets / "weights" / "vit_tiny_patch16_224.in1k.safetensors")
    reference = timm.create_model("vit_tiny_patch16_224")
    reference.load_state_dict(weights, strict=True)
    reference.eval()
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    backbone.load_state_dict({k: v for k, v in weights.items() if not k.startswith("head.")}, strict=True)
    model = MultiTaskSSF(backbone)
    state = {}
    for name, site in model.named_sites():
        state[f"{name}.ssf_scale"] = torch.ones(site.channels)
        if site.ssf_shift is not None:
            state[f"{name}.ssf_shift"] = torch.zeros(site.channels)
    state["head.weight"], state["head.bias"] = weights["head.weight"], weights["head.bias"]
    model.load_task("imagenet", state)
    folded = model.fold("imagenet")

    from PIL import Image

    config = timm.data.resolve_data_config({}, model=reference)
    transform = timm.data.create_transform(**config)
    wnids = list(timm.data.ImageNetInfo().label_names())
    paths = sorted((assets / "imagenet-sample").glob("*.jpg"))
    assert len(paths) == 100
    images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    labels = torch.tensor([wnids.index(p.name.split("_")[0]) for p in paths])
    with torch.no_grad():
        expected = torch.cat([reference(images[i : i + 25]) for i in range(0, 100, 25)])
        got = torch.cat([folded(images[i : i + 25]) for i in range(0, 100, 25)])
        ssf = torch.cat([model(images[i : i + 25], "imagenet") for i in range(0, 100, 25)])
    assert_close(ssf, expected, rtol=1e-5, atol=1e-5)
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    top1 = (got.argmax(1) == labels).float().mean().item()
    assert top1 >= 0.75, top1


def test_vit_attention_takes_the_mixed_kernel_class_and_the_fold_gives_timm_back():
    from timm.layers.attention import Attention

    from ssf_tasks.adapters.vit_attention import MixedTaskAttention

    backbone = timm.create_model("test_vit", num_classes=0)
    keys = set(backbone.state_dict())
    model = MultiTaskSSF(backbone)
    model.add_task("a", 3)
    adopted = [m for m in model.backbone.modules() if type(m) is MixedTaskAttention]
    assert len(adopted) == len(model.backbone.blocks) and all(isinstance(m, Attention) for m in adopted)
    assert all(m.proj.keep_input and not m.qkv.keep_input for m in adopted)
    folded = model.fold("a")
    assert not any(type(m) is MixedTaskAttention for m in folded.modules())
    assert sum(type(m) is Attention for m in folded.modules()) == len(adopted)
    assert set(folded.state_dict()) == keys | {"head.weight", "head.bias"}
