"""Architecture adapters: timm modules given SSF-aware subclasses where a family has a faster path.

An adapter switches the ``__class__`` of eligible timm modules, after the SSF sites are installed, to a subclass
that takes a fused path where it applies (a mixed batch on CUDA, or the one-task training path) and timm's own
``forward`` otherwise. Each subclass directly subclasses the class it replaces, so parameters and keys stay timm's
and the switch back (``restore_timm_classes``) is exact.

``ADAPTERS`` is the one registry: ``MultiTaskSSF`` applies them in order, ``fold`` undoes them, and the benchmarks
and tests toggle their kernels through it. A new family's adapter is a module here plus one entry below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .vit_attention import MixedTaskAttention, adopt_mixed_attention
from .vit_block import FusedBlockChain, adopt_fused_blocks
from .vit_mlp import FusedGeluMlp, adopt_fused_mlp

__all__ = ["ADAPTERS", "Adapter", "adopt_all", "adopted_classes", "restore_timm_classes", "set_mixed_kernel"]


@dataclass(frozen=True)
class Adapter:
    """One module swap.

    Attributes:
        name: what the benchmarks and ``MultiTaskSSF.set_mixed_kernel`` call it.
        module_class: the SSF-aware subclass it gives to eligible modules.
        adopt: switches eligible modules of a backbone (whose sites are installed) to ``module_class``; returns how
            many it switched.
        mixed_kernel: whether ``module_class`` has a mixed-batch kernel behind its ``fused_mixed`` flag.
    """

    name: str
    module_class: type[nn.Module]
    adopt: Callable[[nn.Module], int | bool]
    mixed_kernel: bool


# Order matters: the block chain adopts only blocks whose attention (and MLP) were adopted first.
ADAPTERS: tuple[Adapter, ...] = (
    Adapter("attention", MixedTaskAttention, adopt_mixed_attention, mixed_kernel=True),
    Adapter("gelu", FusedGeluMlp, adopt_fused_mlp, mixed_kernel=True),
    Adapter("block_chain", FusedBlockChain, adopt_fused_blocks, mixed_kernel=False),
)


def adopt_all(backbone: nn.Module) -> dict[str, int]:
    """Apply every adapter to ``backbone``; returns how many modules each one switched."""
    return {adapter.name: int(adapter.adopt(backbone)) for adapter in ADAPTERS}


def adopted_classes() -> tuple[type[nn.Module], ...]:
    """The classes the adapters give to timm modules."""
    return tuple(adapter.module_class for adapter in ADAPTERS)


def restore_timm_classes(model: nn.Module, classes: tuple[type, ...] | None = None) -> None:
    """Give every module of one of ``classes`` (default: every adapter's) the timm class it replaced."""
    classes = adopted_classes() if classes is None else classes
    for module in model.modules():
        if type(module) in classes:
            module.__class__ = type(module).__bases__[0]


def set_mixed_kernel(model: nn.Module, name: str, enabled: bool) -> None:
    """Turn adapter ``name``'s mixed-batch kernel on or off in every adopted module of ``model``."""
    known = {a.name: a for a in ADAPTERS if a.mixed_kernel}
    if name not in known:
        raise ValueError(f"no adapter with a mixed-batch kernel is called {name!r}; known: {', '.join(known)}")
    for module in model.modules():
        if isinstance(module, known[name].module_class):
            module.fused_mixed = enabled
