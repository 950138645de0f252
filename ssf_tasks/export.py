"""A task folded into a plain timm model, in timm's own pretrained format (``model.safetensors``, ``config.json``).

The result loads with ``timm.create_model("local-dir:OUT", pretrained=True)`` and no ssf-tasks installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch
from sqlalchemy import Engine

from .atomic_files import atomic_path
from .config import validate_name
from .engine import load_tasks
from .errors import SSFTasksError

__all__ = ["export_task"]


def export_task(engine: Engine, name: str, out_dir: str | os.PathLike[str], *, version: int | None = None) -> Path:
    """Fold a task into a plain timm model and write it in timm's own pretrained format.

    ``OUT/model.safetensors`` holds the folded state dict (timm's keys; loads strictly into
    ``timm.create_model(architecture, num_classes=K)``), ``OUT/config.json`` the architecture, class count,
    label names and the data config the task was trained with. ``timm.create_model("local-dir:OUT",
    pretrained=True)`` loads both, with no ssf_tasks installed.

    Returns:
        The output folder.
    """
    validate_name("task", name)
    loaded = load_tasks(engine, [name], versions={name: version} if version is not None else None)
    record = loaded.tasks[name]
    backbone = loaded.backbones[record.backbone]
    folded = loaded.model_of(name).fold(name)
    state = {k: v.detach().to("cpu").contiguous() for k, v in folded.state_dict().items()}
    cfg = loaded.data_config(name)
    vtab = record.train_config.transform == "vtab"
    pretrained_cfg = {
        "input_size": list(cfg["input_size"]),
        "interpolation": cfg["interpolation"],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        # VTAB resizes straight to the input size: timm's "squash" eval with crop_pct 1 does exactly that.
        "crop_pct": 1.0 if vtab else cfg["crop_pct"],
        "crop_mode": "squash" if vtab else cfg.get("crop_mode", "center"),
        "num_classes": len(record.class_names),
    }
    config = {
        "architecture": backbone.timm_name.split(".", 1)[0],
        "num_classes": len(record.class_names),
        "num_features": int(folded.num_features),
        "label_names": list(record.class_names),
        "pretrained_cfg": pretrained_cfg,
        "ssf_tasks": {
            "task": name,
            "version": record.version,
            "backbone": backbone.name,
            "backbone_weights": backbone.weights_source,
            "backbone_fingerprint": backbone.fingerprint,
            "test_top1": record.metrics.test_top1,
        },
    }
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SSFTasksError(f"cannot export to {out}: it exists and is not a folder")
    # Both files are written before either replaces its old self, so a failure (full disk, Ctrl-C) never leaves
    # a weights file without its config, or a new model beside an old export's config.
    with atomic_path(out / "model.safetensors") as weights_temp, atomic_path(out / "config.json") as config_temp:
        safetensors.torch.save_file(state, str(weights_temp), metadata={"format": "pt"})
        config_temp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
