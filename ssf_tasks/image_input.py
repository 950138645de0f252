"""The input path of inference: images decoded and resized in parallel, normalised on the device.

Why: decoding a JPEG and resizing it is the slow part of "files in, predictions out"; a GPU forward of ViT-B takes
about 0.1 ms an image. Each image is decoded straight into its slot of a ``uint8`` batch buffer (a quarter of the
float bytes); batches are copied to the device without blocking, and the float conversion and normalisation (timm's
``ToTensor`` + ``Normalize``, the same operations in the same order) run there. While the device runs one batch,
the decoders fill the next ones. Decoders are threads here (:class:`ThreadDecoder`: nothing to start, enough for a
few cores) or worker processes (:class:`~ssf_tasks.decode_workers.ProcessDecoder`: past the GIL on many cores).
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .errors import DataError

__all__ = [
    "ImageSource",
    "InputStage",
    "ThreadDecoder",
    "decode_threads",
    "iter_batches",
    "load_rgb",
    "split_transform",
]

ImageSource = str | os.PathLike[str] | bytes
"""An image to predict: a path, or the encoded bytes of a JPEG/PNG/... (the server's requests)."""

MAX_PIXELS = 64_000_000
"""Images larger than this are refused rather than decoded (a decompression bomb holds gigabytes)."""


def decode_threads() -> int:
    """Default pool size: one thread per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_rgb(source: ImageSource, name: str | None = None) -> Image.Image:
    """An image as an RGB PIL image (grayscale, palette, CMYK, 16-bit and alpha converted as training converts them).

    Raises:
        DataError: naming the image (``name``, else its path) when it is missing, truncated or not an image.
    """
    label = name or (f"{len(source)}-byte image" if isinstance(source, bytes) else str(source))
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"image {label} is too large ({image.width}x{image.height} pixels)")
            return image.convert("RGB")
    except DataError:
        raise
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise DataError(f"cannot read image {label}: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class InputStage:
    """One evaluation transform split where the bytes get large: ``resize`` (PIL, in the threads) and the float
    conversion with normalisation (``normalize``, on the device)."""

    resize: Callable[[Image.Image], Image.Image]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_uint8(self, source: ImageSource, name: str | None = None) -> torch.Tensor:
        """Decode and resize one image: ``uint8 [H, W, 3]`` (the layout PIL gives: one copy, no transpose)."""
        return torch.from_numpy(np.array(self.resize(load_rgb(source, name)), dtype=np.uint8))

    def decode_into(self, out: torch.Tensor, source: ImageSource, name: str | None = None) -> None:
        """Decode and resize one image straight into ``out`` (``uint8 [H, W, 3]``, a slot of a batch buffer)."""
        image = np.asarray(self.resize(load_rgb(source, name)), dtype=np.uint8)
        if image.shape != tuple(out.shape):
            raise DataError(f"image {name or source} is {image.shape} after the transform, not {tuple(out.shape)}")
        out.numpy()[...] = image

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``uint8 [B, H, W, 3]`` to what the full transform gives, ``(x / 255 - mean) / std`` as ``float32
        [B, 3, H, W]``: the same operations in the same order as ``ToTensor`` and ``Normalize``."""
        x = batch.permute(0, 3, 1, 2).to(torch.float32).div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        return x.sub(mean).div(std).contiguous()


def split_transform(transform: Callable) -> InputStage:
    """Split a timm evaluation transform (``Compose([...resize/crop..., ToTensor, Normalize])``).

    Raises:
        ValueError: the transform does not end in a tensor conversion and a normalisation.
    """
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or type(steps[-2]).__name__ not in _TO_TENSOR:
        raise ValueError(f"not a timm evaluation transform ending in ToTensor and Normalize: {transform}")
    normalize = steps[-1]
    return InputStage(
        resize=T.Compose(steps[:-2]),
        mean=tuple(float(m) for m in torch.as_tensor(normalize.mean).flatten()),
        std=tuple(float(s) for s in torch.as_tensor(normalize.std).flatten()),
    )


_TO_TENSOR = ("ToTensor", "MaybeToTensor")


class ThreadDecoder:
    """Decoding in a pool of threads of this process: no start-up cost, the default for small jobs and small hosts.

    :class:`~ssf_tasks.decode_workers.ProcessDecoder` has the same interface and scales past the GIL.
    """

    def __init__(self, threads: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ssf-decode")

    def buffers(self, count: int, batch: int, hw: tuple[int, int], pin: bool = False) -> list[torch.Tensor]:
        """``count`` buffers ``uint8 [batch, H, W, 3]`` (pinned for a GPU)."""
        return [torch.empty(batch, *hw, 3, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]

    def release(self, buffers: Sequence[torch.Tensor]) -> None:
        """Nothing to do: the buffers are freed with their last reference."""

    def submit(
        self, stage: InputStage, out: torch.Tensor, sources: Sequence[ImageSource], names: Sequence[str | None]
    ) -> list[Future[None]]:
        """Decode ``sources`` into the rows of ``out``, one thread task per image."""
        return [
            self.pool.submit(stage.decode_into, out[j], src, name)
            for j, (src, name) in enumerate(zip(sources, names, strict=True))
        ]

    def decode_one(self, stage: InputStage, source: ImageSource, name: str | None, hw: tuple[int, int]) -> torch.Tensor:
        """One image, decoded in the calling thread: ``uint8 [H, W, 3]``."""
        return stage.to_uint8(source, name)

    def close(self) -> None:
        """Stop the threads."""
        self.pool.shutdown(wait=False, cancel_futures=True)


def iter_batches(
    decoder: ThreadDecoder,
    stage: InputStage,
    sources: Sequence[ImageSource],
    batch_size: int,
    input_hw: tuple[int, int],
    *,
    names: Sequence[str] | None = None,
    prefetch: int = 3,
    pin: bool = False,
) -> Iterator[tuple[torch.Tensor, range]]:
    """``(uint8 batch [b, H, W, 3], positions in sources)`` in order, with ``prefetch`` batches decoding ahead.

    The decoder (threads or processes) writes each image straight into its slot of a batch buffer; ``prefetch + 2``
    buffers (pinned for a GPU) are reused in turn, so a buffer is written again only after its batch was copied and
    run (the caller reads each batch's results back before asking for the next one).

    Raises:
        DataError: the first image (in order) that cannot be read, naming it.
    """
    ring = decoder.buffers(prefetch + 2, batch_size, input_hw, pin)
    starts = iter(range(0, len(sources), batch_size))
    pending: deque[tuple[range, torch.Tensor, list[Future[None]]]] = deque()
    turn = 0

    def submit() -> None:
        nonlocal turn
        start = next(starts, None)
        if start is None:
            return
        span = range(start, min(start + batch_size, len(sources)))
        buffer = ring[turn % len(ring)][: len(span)]
        turn += 1
        batch_names = [names[i] for i in span] if names else [None] * len(span)
        pending.append((span, buffer, decoder.submit(stage, buffer, [sources[i] for i in span], batch_names)))

    for _ in range(prefetch + 1):
        submit()
    try:
        while pending:
            span, buffer, futures = pending.popleft()
            for future in futures:
                future.result()
            submit()
            yield buffer, span
    finally:
        for _, _, futures in pending:
            for future in futures:
                future.cancel()
        for _, _, futures in pending:  # a buffer goes back only once nothing writes into it
            for future in futures:
                if not future.cancelled():
                    try:
                        future.result()
                    except Exception:  # noqa: BLE001 (the first error was raised already)
                        pass
        decoder.release(ring)
