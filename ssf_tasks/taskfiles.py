"""A task as bytes: the safetensors payload stored in the registry, and the portable one-file export of a task.

A task file holds the task's tensors and, in the safetensors metadata, its JSON record (a ``TaskFile``) and its
backbone's record, so that another registry can check that it has the same weights before accepting it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from . import registry
from .atomic_files import atomic_path
from .config import BackboneRecord, TaskFile, TaskRecord, validate_name
from .errors import BackboneError, DataError, SSFTasksError

__all__ = [
    "TASK_FILE_METADATA_KEY",
    "check_task_tensors",
    "export_task_file",
    "import_task_file",
    "task_payload",
    "task_tensors",
]

TASK_FILE_METADATA_KEY = "ssf_tasks"
"""Key of the task's JSON record (a :class:`~ssf_tasks.config.TaskFile`) in a task file's safetensors metadata."""

_BACKBONE_METADATA_KEY = "ssf_tasks.backbone"


def task_tensors(payload: bytes, name: str) -> dict[str, torch.Tensor]:
    """A stored task's tensors (γ/β per site and the head) from its safetensors bytes."""
    try:
        return safetensors.torch.load(payload)
    except Exception as e:  # safetensors raises its own error types for damaged bytes
        raise SSFTasksError(f"the stored tensors of task '{name}' cannot be read: {e}") from e


def check_task_tensors(tensors: dict[str, torch.Tensor], backbone: BackboneRecord, classes: int, where: str) -> None:
    """Refuse tensors that would not load onto ``backbone`` as a task of ``classes`` classes: a missing, extra or
    wrongly shaped entry, a dtype other than a float, a non-finite value. Checked on a model built on the meta
    device (no weights read), before anything is written.

    Raises:
        DataError: naming ``where`` and the first problem.
    """
    import timm

    from .errors import StateDictMismatchError
    from .model import MultiTaskSSF

    for key, value in tensors.items():
        if value.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise DataError(f"{where}: '{key}' has dtype {value.dtype}, not a floating point type")
        if not torch.isfinite(value).all():
            raise DataError(f"{where}: '{key}' holds non-finite values")
    with torch.device("meta"):
        model = MultiTaskSSF(timm.create_model(backbone.timm_name.split(".", 1)[0], num_classes=0))
    try:
        found = model._check_task_state("imported", tensors)
    except StateDictMismatchError as e:
        raise DataError(f"{where}: {e}") from e
    if found != classes:
        raise DataError(f"{where}: its head has {found} classes, its record names {classes}")


def task_payload(state: dict[str, torch.Tensor]) -> bytes:
    """The safetensors bytes of a task's tensors, as the registry stores them."""
    return safetensors.torch.save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def export_task_file(
    engine: Engine, name: str, out_file: str | os.PathLike[str], *, version: int | None = None
) -> Path:
    """Write one task as a single portable safetensors file (tensors + its JSON record in the metadata).

    The file names the backbone's fingerprint; :func:`import_task_file` accepts it only into a registry that
    has a backbone with the same weights.
    """
    validate_name("task", name)
    with Session(engine) as s:
        record = registry.get_task(s, name, version)
        payload = registry.get_task_payload(s, name, record.version)
        backbone = registry.get_backbone(s, record.backbone)
    metadata = {
        TASK_FILE_METADATA_KEY: TaskFile.from_record(record).model_dump_json(),
        _BACKBONE_METADATA_KEY: backbone.model_dump_json(),
    }
    out = Path(out_file)
    with atomic_path(out) as temp:
        safetensors.torch.save_file(task_tensors(payload, name), str(temp), metadata=metadata)
    return out


def import_task_file(engine: Engine, file: str | os.PathLike[str], *, new_version: bool = False) -> TaskRecord:
    """Add a task written by :func:`export_task_file` to this registry.

    The task is attached to the local backbone with the same fingerprint (preferring the same name).

    Raises:
        DataError: The file is missing, not a task file, or damaged.
        BackboneError: No backbone here has the weights the task was trained on.
        DuplicateTaskError: The task exists and ``new_version`` is false.
    """
    path = Path(file)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as e:  # safetensors raises its own types for non-safetensors input
        raise DataError(f"{path} is not a task file (cannot read it as safetensors: {e})") from e
    if TASK_FILE_METADATA_KEY not in metadata:
        raise DataError(f"{path} is not an ssf-tasks task file (no '{TASK_FILE_METADATA_KEY}' record inside)")
    try:
        task_file = TaskFile.model_validate_json(metadata[TASK_FILE_METADATA_KEY])
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "record"
        raise DataError(f"invalid task file {path}: {where}: {first['msg']}") from e
    record = task_file.to_record()
    payload = task_payload(tensors)
    if record.payload_sha256 and record.payload_sha256 != hashlib.sha256(payload).hexdigest():
        raise DataError(f"task file {path} is damaged: its tensors do not match the sha256 in its record")
    with Session(engine) as s:
        matches = [b for b in registry.list_backbones(s) if b.fingerprint == record.backbone_fingerprint]
    if not matches:
        origin = metadata.get(_BACKBONE_METADATA_KEY)
        hint = ""
        if origin:
            try:
                b = BackboneRecord.model_validate_json(origin)
                hint = f" (timm model '{b.timm_name}', weights {b.weights_source} in the source registry)"
            except ValidationError:
                pass
        raise BackboneError(
            f"task '{record.name}' needs a backbone with fingerprint {record.backbone_fingerprint[:12]}...{hint}; "
            "no backbone in this registry has those weights: register it first with `ssf-tasks backbone add`"
        )
    chosen = next((b for b in matches if b.name == record.backbone), matches[0])
    record = record.model_copy(update={"backbone": chosen.name})
    check_task_tensors(tensors, chosen, len(record.class_names), f"task file {path}")
    with registry.transaction(engine, f"importing task '{record.name}'") as s:
        return registry.add_task_version(s, record, payload, new_version=new_version)
