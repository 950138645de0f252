"""Shared fixtures: tiny timm models of every family, a device from SSF_TASKS_TEST_DEVICE, asset paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import timm
import torch

if TYPE_CHECKING:
    from sqlalchemy import Engine

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


def missing(reason: str) -> None:
    """Something a test needs is not installed: a skip on a developer's machine, a failure where
    ``SSF_TASKS_REQUIRE_INSTALLED=1`` (``.ci/run`` sets it: what it installs must be there, never silently skipped)."""
    if os.environ.get("SSF_TASKS_REQUIRE_INSTALLED") == "1":
        pytest.fail(f"{reason} (.ci/run installs it)")
    pytest.skip(reason)


def run_in_triton_interpreter(code: str):
    """Run ``code`` in a child Python with Triton's interpreter on (it must be on before a kernel is defined) and
    return the JSON its last printed line holds."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------- registry databases

POSTGRES_ENV = "SSF_TASKS_TEST_POSTGRES"
"""Admin URL of the PostgreSQL server the registry tests run on (they create and drop one database per test
there), or ``off`` to skip the PostgreSQL half of those tests on purpose."""

DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[object]:
    """An AUTOCOMMIT engine on the admin database named by $SSF_TASKS_TEST_POSTGRES.

    An unreachable server fails every PostgreSQL test with the reason (a silent skip would hide that half of the
    suite); only ``SSF_TASKS_TEST_POSTGRES=off`` skips them.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    setting = os.environ.get(POSTGRES_ENV, "").strip() or DEFAULT_POSTGRES_ADMIN_URL
    if setting.lower() == "off":
        pytest.skip(f"{POSTGRES_ENV}=off: the registry's PostgreSQL tests are switched off")
    how_to = (
        f"start the server, point {POSTGRES_ENV} at an admin database URL of one "
        f"(default {DEFAULT_POSTGRES_ADMIN_URL}), or set {POSTGRES_ENV}=off to skip these tests"
    )
    try:
        url = make_url(setting)
    except Exception:
        url = None
    if url is None:
        pytest.fail(f"{POSTGRES_ENV}={setting!r} is not a database URL; {how_to}", pytrace=False)
    shown = url.render_as_string(hide_password=True)
    connect_args = {"connect_timeout": 10} if url.get_driver_name() in ("psycopg", "psycopg2") else {}
    failure = None
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args=connect_args)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except ImportError as e:
        failure = f"no PostgreSQL driver for {shown} ({e}): install the dev extra"
    except Exception as e:
        reason = " ".join(str(getattr(e, "orig", None) or e).split())
        failure = f"cannot reach PostgreSQL at {shown}: {reason}; {how_to}"
    if failure is not None:  # outside the except: the message alone, without the driver's exception chain
        pytest.fail(failure, pytrace=False)
    yield engine
    engine.dispose()


@contextmanager
def postgres_database(admin: Engine, *, template: str = "template0") -> Iterator[str]:
    """A new PostgreSQL database on the server of ``admin`` (see ``postgres_admin``), a copy of ``template``,
    dropped on exit; yields its URL.

    A test that needs a registry in some state builds it once in one database and copies it per test with
    ``template=<its name>``: a copy holds the same rows, ids and sequence positions. A template must have no
    open connection while it is copied.
    """
    from sqlalchemy import text

    name = f"ssf_test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        # template0 is never connected to, so creating from it cannot fail on a busy template1.
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            # FORCE: a worker process a failed test left behind must not keep the database alive.
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A URL of a new, empty registry database: an SQLite file under tmp_path, or a PostgreSQL database created
    for this test alone on the server of $SSF_TASKS_TEST_POSTGRES and dropped after it."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
        return
    with postgres_database(request.getfixturevalue("postgres_admin")) as url:
        yield url
