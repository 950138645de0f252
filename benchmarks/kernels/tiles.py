"""The tile sweep that the kernel micro-benchmarks share, and ``main``: every kernel's sweep in one run.

Why: each training kernel, and the mixed-batch GELU, keeps its tile as constants of its module (``_BLOCK_R``,
``_WARPS``, ``_PROGRAMS_PER_SM``, ...), chosen by a sweep at ViT-B's shapes; on another card or shape the best tile
may differ, and this reruns the choice. A sweep sets the constants, times the op with CUDA-graph replays
(``do_bench_cudagraph``, so the host's launch time is left out), prints each time with the result's errors against a
reference, and puts the module's own tile back. Needs a CUDA GPU and Triton. Numbers: BENCHMARKS.md.

    ssf-tasks bench kernel tiles [--sweep]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType

from triton.testing import do_bench_cudagraph

__all__ = ["main", "time_tiles"]


def time_tiles(
    module: ModuleType,
    names: tuple[str, ...],
    grid: Iterable[tuple],
    run: Callable[[], object],
    describe: Callable[[object], str],
    baseline_us: float,
    baseline: str,
) -> tuple | None:
    """Time ``run`` at the module's own tile, then at each tile of ``grid``; returns the fastest tile.

    ``names`` are the module's tile constants, in the order of each tile's values; ``describe`` gives a result's
    errors; times are printed as multiples of ``baseline_us`` (``baseline`` names it).
    """
    default = tuple(getattr(module, name) for name in names)
    best = None
    try:
        for tile in [default, *(t for t in grid if t != default)]:
            for name, value in zip(names, tile, strict=True):
                setattr(module, name, value)
            values = zip(names, tile, strict=True)
            label = "kernel " + ", ".join(f"{name.strip('_').lower()} {value}" for name, value in values)
            try:
                result = run()
                t = do_bench_cudagraph(run, rep=300) * 1000
            except Exception as error:  # a tile that does not compile (registers, shared memory) is reported
                print(f"   {label}: failed ({error})")
                continue
            print(f"   {label}: {t:.1f} us ({t / baseline_us:.2f}x {baseline})  {describe(result)}", flush=True)
            if best is None or t < best[0]:
                best = (t, tile)
    finally:
        for name, value in zip(names, default, strict=True):
            setattr(module, name, value)
    if best is None:
        return None
    print(f"best: {best[1]} at {best[0]:.1f} us")
    return best[1]


def main(sweep: bool = False) -> dict[str, tuple | None]:
    """Each kernel benchmark with a tile sweep, one after another, at its module's own tile (``sweep``: and at
    every tile of its grid); prints and returns the fastest tile of each (None where no tile ran)."""
    from . import gelu_backward, mixed_gelu, qkv_backward, residual_norm

    best = {}
    for module in (mixed_gelu, gelu_backward, qkv_backward, residual_norm):
        name = module.__name__.rsplit(".", 1)[-1].replace("_", "-")
        print(f"--- {name}", flush=True)
        best[name] = module.main(sweep)
    for name, tile in best.items():
        print(f"{name}: fastest tile {tile}", flush=True)
    return best
