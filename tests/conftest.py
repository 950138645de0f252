"""Shared fixtures: tiny timm models of every family, a device from SSF_TASKS_TEST_DEVICE, asset paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"

# (timm name, create_model kwargs, input size): small configurations of the paper's CNN / Transformer / MLP
# families, plus timm's fused norm+act variants (BatchNormAct2d, GroupNormAct, LayerNormAct2d) and RmsNorm.
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "vit": ("test_vit", {}, 160),
    "vit_rmsnorm": ("test_vit4", {}, 160),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 64, "window_size": 4},
        64,
    ),
    "convnext": ("test_convnext", {}, 64),
    "resnet": ("test_resnet", {}, 64),
    "efficientnet": ("test_efficientnet", {}, 64),
    "efficientnet_gn": ("test_efficientnet_gn", {}, 64),
    "efficientnet_ln": ("test_efficientnet_ln", {}, 64),
    "mixer": ("mixer_s32_224", {"img_size": 64}, 64),
}


def device_under_test() -> torch.device:
    return torch.device(os.environ.get("SSF_TASKS_TEST_DEVICE", "cpu"))


def make_backbone(family: str) -> torch.nn.Module:
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=0, **kwargs).eval().to(device_under_test())


def make_images(family: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    size = FAMILIES[family][2]
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator).to(device_under_test())


@pytest.fixture
def device() -> torch.device:
    return device_under_test()


@pytest.fixture(scope="session")
def assets() -> Path:
    if not ASSETS.is_dir():
        pytest.skip(f"shared assets not found at {ASSETS}")
    return ASSETS


def write_image_folder(
    root: Path, classes: list[str], per_split: dict[str, int], *, size: int = 40, seed: int = 0
) -> list[Path]:
    """Real JPEG files in ImageFolder layout (``root/<split>/<class>/*.jpg``): each class a colour of its own under
    noise and a random square, so that a few steps of training separate them. Returns every file written."""
    from PIL import Image, ImageDraw

    generator = torch.Generator().manual_seed(seed)
    written = []
    for split, count in per_split.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = torch.tensor([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 160) % 256], dtype=torch.float32)
            for i in range(count):
                noise = torch.randn(size, size, 3, generator=generator) * 30
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
                image = Image.fromarray(pixels, "RGB")
                x, y = (int(v) for v in torch.randint(0, size // 2, (2,), generator=generator))
                ImageDraw.Draw(image).rectangle([x, y, x + size // 3, y + size // 3], fill=(255 - c * 60, 40, 90))
                path = folder / f"{split}_{name}_{i}.jpg"
                image.save(path, quality=90)
                written.append(path)
    return written


def run_in_triton_interpreter(code: str):
    """Run ``code`` in a child Python with Triton's interpreter on (it must be on before a kernel is defined) and
    return the JSON its last printed line holds."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
