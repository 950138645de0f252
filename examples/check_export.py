"""Check an ``ssf-tasks export`` folder with plain timm: no ssf_tasks import anywhere in this file.

The export is loaded the two ways a user would (``timm.create_model("local-dir:DIR", pretrained=True)``,
and ``create_model(architecture, num_classes=K)`` + ``load_state_dict`` of the safetensors file), preprocessed
with timm's own transform built from ``config.json``, and its predictions are compared with the rows of an
``ssf-tasks predict`` CSV for the same task: the labels must be identical and the scores equal to 1e-4.

Usage::

    python examples/check_export.py --export demo/export/mnist --predictions demo/predictions.csv --task mnist
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import timm
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.data import create_transform, resolve_data_config


def load_export(folder: Path) -> tuple[torch.nn.Module, list[str]]:
    """The exported model (through timm's local-dir loader) and its label names, checked against a manual load."""
    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=True).eval()
    manual = timm.create_model(config["architecture"], num_classes=config["num_classes"]).eval()
    manual.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    for (key, a), b in zip(model.state_dict().items(), manual.state_dict().values(), strict=True):
        if not torch.equal(a, b):
            raise SystemExit(f"local-dir and manual loads differ at {key}")
    return model, list(config["label_names"])


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="folder written by 'ssf-tasks export'")
    parser.add_argument("--predictions", type=Path, required=True, help="CSV written by 'ssf-tasks predict'")
    parser.add_argument("--task", required=True, help="the exported task's name")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed score difference")
    args = parser.parse_args(argv)

    model, labels = load_export(args.export)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    with args.predictions.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["task"] == args.task]
    if not rows:
        raise SystemExit(f"no rows of task {args.task!r} in {args.predictions}")

    worst, mismatches = 0.0, []
    for start in range(0, len(rows), 64):
        batch = rows[start : start + 64]
        images = torch.stack([transform(Image.open(r["path"]).convert("RGB")) for r in batch])
        scores, columns = model(images).softmax(-1).max(-1)
        for row, score, column in zip(batch, scores.tolist(), columns.tolist(), strict=True):
            worst = max(worst, abs(score - float(row["score"])))
            if labels[column] != row["label"]:
                mismatches.append(f"{row['path']}: export says {labels[column]}, predict said {row['label']}")
    print(f"export of {args.task!r}: {len(rows)} images, {len(mismatches)} label mismatches, ", end="")
    print(f"max score diff {worst:.2e}")
    if mismatches or worst > args.tolerance:
        print("\n".join(mismatches[:10]), file=sys.stderr)
        print("FAILED: the export does not reproduce predict", file=sys.stderr)
        return 1
    print("OK: the export (plain timm, no ssf_tasks) reproduces ssf-tasks predict")
    return 0


if __name__ == "__main__":
    sys.exit(main())
