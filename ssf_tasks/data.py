"""Image datasets from folders or CSV manifests, and timm transforms for the two SSF protocols.

Everything that can be wrong with a dataset is checked when it is loaded (missing folders, empty classes,
unknown labels, unreadable images), so a training run fails in its first second with a message that names
the file, not an hour later inside a DataLoader worker.

Layouts understood by :func:`load_splits`:

* an ImageFolder tree ``DIR/train/<class>/*.jpg`` with optional ``DIR/val/`` and ``DIR/test/``;
* CSV manifests ``DIR/train.csv`` (required), ``DIR/val.csv``, ``DIR/test.csv`` with header ``path,label``;
* a single CSV manifest file (``path,label``), used as the training split.

Class names are the sorted class folder names (or label strings) of the training split; the label index of a
sample is the position of its class name in that list, as in torchvision's ImageFolder.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torch.utils.data import Dataset

from ssf_tasks.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "DatasetSplits",
    "ImageDataset",
    "ImageSample",
    "Protocol",
    "build_transform",
    "load_splits",
    "read_manifest",
    "read_predict_manifest",
    "resolve_input_config",
    "verify_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
SPLITS: tuple[str, str, str] = ("train", "val", "test")

Protocol = Literal["vtab", "fgvc"]
PathLike = str | os.PathLike[str]


class ImageSample(NamedTuple):
    """One labelled image: where it is and the index of its class."""

    path: Path
    label: int


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's classes and its train / val / test samples (val and test may be empty).

    Attributes:
        root: The folder or manifest the dataset was read from.
        class_names: Class names in label-index order.
        train: Training samples (never empty).
        val: Validation samples.
        test: Test samples.
    """

    root: Path
    class_names: list[str]
    train: list[ImageSample]
    val: list[ImageSample] = field(default_factory=list)
    test: list[ImageSample] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """How many classes the training split defines."""
        return len(self.class_names)

    def split(self, name: str) -> list[ImageSample]:
        """The samples of split ``name`` (``train``, ``val`` or ``test``)."""
        if name not in SPLITS:
            raise DataError(f"unknown split '{name}' (use one of {', '.join(SPLITS)})")
        return list(getattr(self, name))


# --------------------------------------------------------------------------------------------------------
# Reading layouts
# --------------------------------------------------------------------------------------------------------


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _scan_split_folder(split_dir: Path) -> list[tuple[Path, str]]:
    """``(image path, class name)`` pairs of one ImageFolder split, in a stable order."""
    classes = sorted(p for p in split_dir.iterdir() if p.is_dir() and not _is_hidden(p))
    if not classes:
        raise DataError(f"no class folders in {split_dir} (expected {split_dir}/<class>/<image files>)")
    items: list[tuple[Path, str]] = []
    for class_dir in classes:
        files = sorted(p for p in class_dir.iterdir() if p.is_file() and not _is_hidden(p))
        for file in files:
            if file.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"not an image file: {file} (image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
        if not files:
            raise DataError(f"class folder {class_dir} has no images")
        items.extend((file, class_dir.name) for file in files)
    return items


def _read_csv(csv_path: PathLike, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV whose header must be exactly ``columns``, with their 1-based line numbers.

    Paths in the file may be relative to the CSV's folder; they are resolved here, and every one must exist.
    """
    file = Path(csv_path)
    if not file.is_file():
        raise DataError(f"manifest not found: {file}")
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {file}: {exc}") from exc
    if not lines:
        raise DataError(f"manifest {file} is empty (expected a header line '{','.join(columns)}')")
    header = [name.strip().lower() for name in lines[0]]
    if header != list(columns):
        unknown = [name for name in header if name not in columns]
        missing = [name for name in columns if name not in header]
        detail = (
            f"unknown column '{unknown[0]}'"
            if unknown
            else f"missing column '{missing[0]}'"
            if missing
            else "columns in the wrong order"
        )
        raise DataError(f"manifest {file} has header '{','.join(lines[0])}': {detail} (expected '{','.join(columns)}')")
    rows: list[tuple[int, dict[str, str]]] = []
    for number, values in enumerate(lines[1:], start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(columns):
            raise DataError(
                f"manifest {file} line {number}: expected {len(columns)} fields, got {len(values)}: {values}"
            )
        row = {name: value.strip() for name, value in zip(columns, values, strict=True)}
        for name, value in row.items():
            if not value:
                raise DataError(f"manifest {file} line {number}: empty '{name}'")
        path = Path(row["path"]).expanduser()
        if not path.is_absolute():
            path = file.parent / path
        if not path.is_file():
            raise DataError(f"manifest {file} line {number}: file not found: {path}")
        row["path"] = str(path)
        rows.append((number, row))
    return rows


def read_manifest(csv_path: PathLike) -> list[tuple[Path, str]]:
    """Read a labelled-image manifest with header ``path,label``.

    Args:
        csv_path: The CSV file. Relative image paths are relative to its folder.

    Returns:
        ``(image path, class name)`` pairs in file order.

    Raises:
        DataError: The file is missing, its header is not ``path,label``, a row is malformed or names a
            missing file (the message names the CSV, the line and the path).
    """
    return _read_pairs(csv_path, "label")


def read_predict_manifest(csv_path: PathLike) -> list[tuple[Path, str]]:
    """Read a prediction manifest with header ``path,task``: which image to run through which task.

    Args:
        csv_path: The CSV file. Relative image paths are relative to its folder.

    Returns:
        ``(image path, task name)`` pairs in file order.

    Raises:
        DataError: The file is missing, its header is not ``path,task``, or a row is malformed or names a
            missing file.
    """
    return _read_pairs(csv_path, "task")


def _read_pairs(csv_path: PathLike, column: str) -> list[tuple[Path, str]]:
    """``(path, <column>)`` for every row of a two-column manifest; an empty one is an error."""
    rows = _read_csv(csv_path, ("path", column))
    if not rows:
        raise DataError(f"manifest {csv_path} has no rows")
    return [(Path(row["path"]), row[column]) for _, row in rows]


def verify_images(paths: Iterable[Path], *, workers: int = 8) -> None:
    """Open every image once with PIL's ``verify()``: cheap (no full decode) but catches non-images.

    Args:
        paths: The image files.
        workers: Threads to use; file opening is I/O bound, so a few threads help on large datasets.

    Raises:
        DataError: naming the first file that PIL cannot identify or that fails verification.
    """

    def check(path: Path) -> None:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError...)
            raise DataError(f"corrupt or non-image file: {path} ({type(exc).__name__}: {exc})") from exc

    # map() re-raises the first failure in input order, so the message is deterministic.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for _ in pool.map(check, list(paths)):
            pass


def _to_samples(
    items: Sequence[tuple[Path, str]], class_index: Mapping[str, int], where: str, split: str
) -> list[ImageSample]:
    samples = []
    for path, name in items:
        if name not in class_index:
            raise DataError(f"{split} class '{name}' ({path}) is not a class of the training split in {where}")
        samples.append(ImageSample(path, class_index[name]))
    return samples


def load_splits(source: PathLike, *, verify: bool = True) -> DatasetSplits:
    """Read a dataset (ImageFolder tree, folder of split manifests, or one manifest) and check it.

    Args:
        source: A dataset folder or a ``path,label`` CSV file (see the module docstring).
        verify: Open every image once to catch corrupt or non-image files up front.

    Returns:
        The splits, with class names taken from the training split.

    Raises:
        DataError: naming the offending folder, manifest line or file.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError(f"dataset not found: {root}")
    raw: dict[str, list[tuple[Path, str]]] = {}
    if root.is_file():
        raw["train"] = read_manifest(root)
    elif (root / "train").is_dir():
        for split in SPLITS:
            if (root / split).is_dir():
                raw[split] = _scan_split_folder(root / split)
    elif (root / "train.csv").is_file():
        for split in SPLITS:
            if (root / f"{split}.csv").is_file():
                raw[split] = read_manifest(root / f"{split}.csv")
    else:
        raise DataError(
            f"no train/ folder and no train.csv manifest in {root} "
            "(expected DIR/train/<class>/<images> or DIR/train.csv with header 'path,label')"
        )

    class_names = sorted({name for _, name in raw["train"]})
    class_index = {name: i for i, name in enumerate(class_names)}
    splits = {split: _to_samples(items, class_index, str(root), split) for split, items in raw.items()}
    if verify:
        verify_images(sample.path for samples in splits.values() for sample in samples)
    return DatasetSplits(
        root=root,
        class_names=class_names,
        train=splits["train"],
        val=splits.get("val", []),
        test=splits.get("test", []),
    )


# --------------------------------------------------------------------------------------------------------
# Torch dataset and transforms
# --------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset[tuple[Any, int]]):
    """Labelled images read with PIL and converted to RGB (grayscale and palette images included).

    Args:
        samples: ``(path, label)`` pairs, e.g. ``DatasetSplits.train``.
        transform: Applied to the RGB PIL image, typically from :func:`build_transform`.
    """

    def __init__(
        self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], Any] | None = None
    ) -> None:
        self.samples = [ImageSample(Path(path), int(label)) for path, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        return (self.transform(rgb) if self.transform is not None else rgb), label


def resolve_input_config(
    model_or_data_config: nn.Module | Mapping[str, Any],
    *,
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """timm's data config for a model (or a config dict), with the overrides this project allows.

    Args:
        model_or_data_config: A timm model (its ``pretrained_cfg`` is used) or a data config / pretrained
            config mapping with timm's keys (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        input_size: Square side or ``(height, width)``; smaller than the pretrained size makes CPU runs cheap.
        mean: Normalisation mean (e.g. from :func:`ssf_tasks.backbones.weights_data_config`).
        std: Normalisation std.

    Returns:
        A dict with ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``, ``crop_mode``.
    """
    if isinstance(model_or_data_config, nn.Module):
        config = resolve_data_config(model=model_or_data_config)
    else:
        config = resolve_data_config(pretrained_cfg=dict(model_or_data_config))
    if input_size is not None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height <= 0 or width <= 0:
            raise DataError(f"input size must be positive, got {input_size}")
        config["input_size"] = (config["input_size"][0], int(height), int(width))
    if mean is not None:
        config["mean"] = tuple(float(m) for m in mean)
    if std is not None:
        config["std"] = tuple(float(s) for s in std)
    return config


def build_transform(
    model_or_data_config: nn.Module | Mapping[str, Any],
    *,
    train: bool,
    protocol: Protocol = "vtab",
    input_size: int | tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """The image transform for one split under one of the SSF paper's two protocols.

    * ``vtab``: resize straight to the input size (no crop, aspect ratio not kept) and normalise, for
      training and evaluation alike; VTAB-1k images are small and their content fills the frame.
    * ``fgvc``: training uses a random resized crop and a horizontal flip; evaluation uses timm's standard
      eval transform (resize by ``1 / crop_pct`` then center crop).

    Args:
        model_or_data_config: See :func:`resolve_input_config`.
        train: Training (augmenting) or evaluation transform.
        protocol: ``"vtab"`` or ``"fgvc"``.
        input_size: Override of the model's input size.
        mean: Override of the normalisation mean.
        std: Override of the normalisation std.

    Returns:
        A callable from an RGB PIL image to a float tensor ``[3, H, W]``.
    """
    config = resolve_input_config(model_or_data_config, input_size=input_size, mean=mean, std=std)
    common = {
        "input_size": config["input_size"],
        "interpolation": config["interpolation"],
        "mean": config["mean"],
        "std": config["std"],
    }
    if protocol == "vtab":
        # timm's "squash" eval path resizes to (H / crop_pct, W / crop_pct); crop_pct=1 makes that the
        # direct resize VTAB asks for, and the center crop that follows is then a no-op.
        return create_transform(**common, is_training=False, crop_pct=1.0, crop_mode="squash")
    if protocol == "fgvc":
        if train:
            return create_transform(**common, is_training=True, color_jitter=None)
        return create_transform(
            **common, is_training=False, crop_pct=config["crop_pct"], crop_mode=config.get("crop_mode")
        )
    raise DataError(f"unknown protocol '{protocol}' (use 'vtab' or 'fgvc')")
