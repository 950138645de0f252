"""Pydantic models for everything ssf-tasks reads from a user, a file or the registry.

Every model forbids unknown fields: a misspelt option (``learning_rate`` for ``lr``) or a record written by a
different version of ssf-tasks should fail loudly when it is read, not be silently dropped. The registry
(``registry.py``) and the task files of ``export``/``import`` both go through these models, so a record means
the same thing wherever it comes from.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from ssf_tasks.errors import InvalidNameError

__all__ = [
    "MAX_NAME_LENGTH",
    "RESERVED_TASK_NAMES",
    "TASK_FILE_FORMAT_VERSION",
    "TASK_NAME_PATTERN",
    "BackboneRecord",
    "TaskFile",
    "TaskMetrics",
    "TaskRecord",
    "TrainConfig",
    "validate_name",
]

TASK_NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
"""Task and backbone names: lower case, digits, ``.``, ``_``, ``-``; they end up in file names and URLs."""

MAX_NAME_LENGTH = 64
"""Longest task or backbone name; it is also the width of the name columns in the registry."""

TASK_FILE_FORMAT_VERSION = 1
"""The newest task-file format this version of ssf-tasks writes and can read."""

_NAME_RE = re.compile(TASK_NAME_PATTERN)
_SHA256_PATTERN = r"^[0-9a-f]{64}$"


RESERVED_TASK_NAMES = frozenset({"auto", "none"})
"""Words with a meaning in requests and answers (see :mod:`ssf_tasks.routing`), so no task has them as a name."""


def validate_name(kind: str, name: str) -> str:
    """Check a task or backbone name against the naming rule.

    Names are used as registry keys, CLI arguments and file names, so they are kept to a small, shell-safe
    and case-insensitive-filesystem-safe alphabet.

    Args:
        kind: What is being named (``"task"`` or ``"backbone"``); used in the error message only.
        name: The name to check.

    Returns:
        The name, unchanged, so the function can be used as a validator.

    Raises:
        InvalidNameError: If the name breaks the rule; the message states the rule.
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use 1-{MAX_NAME_LENGTH} characters from a-z, 0-9, '.', '_' "
            f"and '-', starting with a letter or digit (pattern {TASK_NAME_PATTERN})"
        )
    if kind == "task" and name in RESERVED_TASK_NAMES:
        raise InvalidNameError(
            f"'{name}' cannot name a task: requests use it to ask for routing ('auto') or get it when no task fits"
        )
    return name


def _utc(value: datetime) -> datetime:
    # Store and compare every timestamp in UTC so a record read back equals the one written, whatever the
    # database does with time zones. A naive datetime is taken as local time, as Python itself does.
    return value.astimezone(timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


TaskName = Annotated[str, AfterValidator(lambda v: validate_name("task", v))]
BackboneName = Annotated[str, AfterValidator(lambda v: validate_name("backbone", v))]
UTCDatetime = Annotated[datetime, AfterValidator(_utc)]
Sha256Hex = Annotated[str, Field(pattern=_SHA256_PATTERN)]


class TrainConfig(BaseModel):
    """How one task was (or will be) trained; stored with every task version so a run can be repeated."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=5e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_epochs: int = Field(default=1, ge=0)
    seed: int = 0
    transform: Literal["vtab", "fgvc"] = "vtab"
    input_size: int | None = Field(
        default=None, ge=8, description="Square input side; None keeps the backbone's pretrained size."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(default=True, description="bf16 autocast on GPU; ignored on CPU.")
    init_from: str | None = Field(default=None, description="Task whose γ/β start this run.")
    patience: int | None = Field(default=None, ge=1, description="Epochs without improvement before stopping.")
    num_workers: int = Field(default=0, ge=0)
    sigma: float = Field(default=0.02, ge=0, description="Init std of γ (around 1) and β (around 0).")
    head_init: Literal["probe", "random"] = Field(
        default="probe",
        description="Start the head as a linear probe fitted on the frozen features (its L2 weight chosen on val), "
        "or at random.",
    )
    adapt: Literal["scale_shift", "scale", "shift"] = Field(
        default="scale_shift", description="Which of γ and β train; the other stays at identity (γ = 1, β = 0)."
    )
    train_sites: list[str] | None = Field(
        default=None,
        description="fnmatch patterns of the site names whose γ/β train (e.g. '*.attn.*'); the other sites stay at "
        "identity. None trains every site.",
    )
    nproc: int = Field(
        default=1,
        ge=1,
        description="Data-parallel processes (one GPU each on CUDA); each takes batch_size / nproc images a step.",
    )
    refit: bool = Field(
        default=False,
        description="Once val has chosen the best epoch E, train again from the same start on train + val for E "
        "epochs and store that (the VTAB-1k protocol: the stored task has seen every labelled image).",
    )


class BackboneRecord(BaseModel):
    """A registered backbone: which timm model, where its weights come from, and their fingerprint.

    The fingerprint is what ties a task to the exact weights it was trained on; the name is only a label.
    """

    model_config = ConfigDict(extra="forbid")

    name: BackboneName
    timm_name: str = Field(min_length=1)
    weights_source: str = Field(
        min_length=1, description='"hub:<tag>", "file:<absolute path>" or "package:<python package>".'
    )
    fingerprint: Sha256Hex
    num_features: int = Field(ge=1)
    created_at: UTCDatetime = Field(default_factory=_now)


class TaskMetrics(BaseModel):
    """What training measured; ``None`` where there was no split to measure on."""

    model_config = ConfigDict(extra="forbid")

    val_top1: float | None = None
    test_top1: float | None = None
    epochs_run: int = Field(default=0, ge=0)
    train_seconds: float = Field(default=0.0, ge=0)
    best_epoch: int | None = None
    history: list[dict[str, float]] = Field(
        default_factory=list,
        description="Per epoch: 'epoch', 'loss', 'train_top1', 'val_top1' where measured; epoch 0 is the probe head.",
    )
    refit_epochs: int | None = Field(
        default=None, description="Epochs of the refit on train + val that made the stored state (None: no refit)."
    )


class TaskRecord(BaseModel):
    """One version of a task, as stored in and read back from the registry.

    The γ/β + head payload (safetensors bytes, often megabytes) is deliberately not a field: listing tasks
    should not load every task's weights. Fetch it with ``registry.get_task_payload``.

    ``version`` is assigned by the registry when the record is added (whatever the caller put there), and
    ``payload_sha256`` may be left empty on the way in: the registry computes it from the payload, and if it
    is given it must match.
    """

    model_config = ConfigDict(extra="forbid")

    name: TaskName
    version: int = Field(default=1, ge=1)
    backbone: BackboneName
    backbone_fingerprint: Sha256Hex
    class_names: list[str] = Field(min_length=1)
    train_config: TrainConfig = Field(default_factory=TrainConfig)
    metrics: TaskMetrics = Field(default_factory=TaskMetrics)
    payload_sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    created_at: UTCDatetime = Field(default_factory=_now)

    @field_validator("class_names")
    @classmethod
    def _unique_class_names(cls, value: list[str]) -> list[str]:
        # Class names map to head outputs by position; a repeated name makes a prediction ambiguous.
        repeated = sorted(name for name, count in Counter(value).items() if count > 1)
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(map(repr, repeated))}")
        return value


class TaskFile(TaskRecord):
    """A task exported as JSON beside its safetensors payload, so it can be imported elsewhere.

    It is a ``TaskRecord`` plus the file-format version, so a future format change can be detected rather
    than misread.
    """

    format_version: int = Field(default=TASK_FILE_FORMAT_VERSION, ge=1)

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > TASK_FILE_FORMAT_VERSION:
            raise ValueError(
                f"task file format {value} is newer than this ssf-tasks reads "
                f"(up to {TASK_FILE_FORMAT_VERSION}): upgrade ssf-tasks"
            )
        return value

    @classmethod
    def from_record(cls, record: TaskRecord) -> TaskFile:
        """Wrap a registry record for export."""
        return cls(**record.model_dump())

    def to_record(self) -> TaskRecord:
        """Drop the file-format field, giving the record to add to a registry."""
        return TaskRecord(**self.model_dump(exclude={"format_version"}))
