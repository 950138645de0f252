"""Which modules of a timm model are SSF sites, and along which axis their channels lie.

A site is an op with per-output-channel linear coefficients (a weight, maybe a bias), so that a
per-channel ``y = γ ⊙ x + β`` right after it can later be folded into that weight and bias. The channel
axis is fixed by the layer's type (never guessed from a tensor shape): timm's ``LayerNorm2d`` is an
``nn.LayerNorm`` subclass that normalises axis 1, so subclasses are matched before their parents.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from timm import layers as timm_layers
from torch import nn

from .errors import NoSitesError, PatternMatchError

__all__ = ["SiteRule", "SiteSpec", "find_sites", "rule_for"]

NormForward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class SiteRule:
    """How one layer type becomes a site.

    Attributes:
        layer_type: the module class this rule matches (subclasses included).
        channel_axis: the axis of the layer's output that holds its channels (-1 or 1).
        norm_forward: for timm's fused norm+activation layers, the parent norm's forward; SSF then goes
            between the norm and the activation so that it can still be folded into the norm's affine.
    """

    layer_type: type[nn.Module]
    channel_axis: int
    norm_forward: NormForward | None = None


@dataclass(frozen=True)
class SiteSpec:
    """A site found in a model: the module's dotted name, the module, and its rule."""

    name: str
    module: nn.Module
    rule: SiteRule


def _optional(name: str) -> type[nn.Module] | None:
    return getattr(timm_layers, name, None)


def _build_rules() -> list[SiteRule]:
    """Most specific types first: the first rule whose type matches wins."""
    rules: list[tuple[str | type[nn.Module], int, NormForward | None]] = [
        # timm's fused norm + activation layers: normalise with the parent class, then SSF, then drop/act.
        ("BatchNormAct2d", 1, nn.BatchNorm2d.forward),
        ("GroupNormAct", 1, nn.GroupNorm.forward),
        ("GroupNorm1Act", 1, nn.GroupNorm.forward),
        ("LayerNormAct2d", 1, timm_layers.LayerNorm2d.forward),
        ("LayerNormAct", -1, nn.LayerNorm.forward),
        ("RmsNormAct2d", 1, timm_layers.RmsNorm2d.forward),
        ("RmsNormAct", -1, timm_layers.RmsNorm.forward),
        # Channels-first norms that subclass channels-last ones.
        ("LayerNorm2d", 1, None),
        ("LayerNorm2dFp32", 1, None),
        ("RmsNorm2d", 1, None),
        ("RmsNorm2dFp32", 1, None),
        ("RmsNorm", -1, None),
        ("RmsNormFp32", -1, None),
        (nn.LayerNorm, -1, None),
        (nn.RMSNorm, -1, None),
        (nn.GroupNorm, 1, None),
        (nn.BatchNorm2d, 1, None),
        (nn.BatchNorm1d, 1, None),
        (nn.Linear, -1, None),
        (nn.Conv2d, 1, None),
        (nn.Conv1d, 1, None),
    ]
    out = []
    for layer_type, axis, norm_forward in rules:
        cls = _optional(layer_type) if isinstance(layer_type, str) else layer_type
        if cls is not None:
            out.append(SiteRule(cls, axis, norm_forward))
    return out


_RULES = _build_rules()

# Layers that look like a Conv2d but standardise their weight in forward: a scale folded into the weight
# would be normalised away, so they can never be sites.
_NEVER_SITES: tuple[type[nn.Module], ...] = tuple(
    cls
    for cls in (_optional(n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"))
    if cls is not None
)


def rule_for(module: nn.Module) -> SiteRule | None:
    """The rule for ``module``, or None when it cannot carry foldable SSF parameters."""
    if isinstance(module, _NEVER_SITES):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None  # a norm without affine weight has nothing to fold a scale into
    for rule in _RULES:
        if isinstance(module, rule.layer_type):
            is_norm = not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
            return None if is_norm and weight.ndim != 1 else rule
    return None


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """A pattern matches a name exactly, as a glob, or as a dotted suffix (``qkv`` matches ``blocks.0.attn.qkv``)."""
    return any(
        name == p or fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or fnmatch.fnmatchcase(name, "*." + p)
        for p in patterns
    )


def find_sites(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[SiteSpec]:
    """Every SSF site of ``model`` outside its classifier, in ``named_modules()`` order.

    Args:
        model: a timm model (usually created with ``num_classes=0``).
        include: if given, keep only sites whose name matches one of these patterns.
        exclude: drop sites whose name matches one of these patterns.

    Raises:
        PatternMatchError: a pattern matched no site; the message lists real site names.
        NoSitesError: nothing left to adapt.
    """
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    skip = {id(m) for m in classifier.modules()} if isinstance(classifier, nn.Module) else set()
    found: list[SiteSpec] = []
    inside_site: list[str] = []
    for name, module in model.named_modules():
        if not name or id(module) in skip:
            continue
        if any(name.startswith(p + ".") for p in inside_site):
            continue  # a site's own children (e.g. a fused norm's activation) are never sites
        rule = rule_for(module)
        if rule is not None:
            found.append(SiteSpec(name, module, rule))
            inside_site.append(name)
    names = [s.name for s in found]
    for label, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(_matches(n, [pattern]) for n in names):
                shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
                raise PatternMatchError(f"{label} pattern {pattern!r} matches no site; sites are: {shown}")
    if include:
        found = [s for s in found if _matches(s.name, include)]
    if exclude:
        found = [s for s in found if not _matches(s.name, exclude)]
    if not found:
        raise NoSitesError(
            f"{type(model).__name__} has no supported SSF site (Linear, Conv, LayerNorm, BatchNorm, GroupNorm, "
            "RmsNorm with affine weights) left to adapt"
        )
    return found
