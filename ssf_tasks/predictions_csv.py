"""Predictions as a CSV file: ``path,task,label,score`` (plus ``label_2,score_2,...`` for top-k, and
``route_score`` when some image was sent as ``task: auto``; its ``task`` is then the routed one, or ``none``)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

from .atomic_files import atomic_path
from .engine import Prediction

__all__ = ["write_predictions"]


def write_predictions(predictions: Sequence[Prediction], out: str | os.PathLike[str], *, top_k: int = 1) -> Path:
    """Write predictions as CSV ``path,task,label,score`` (plus ``label_2,score_2,...`` for top-k), atomically."""
    header = ["path", "task", "label", "score"]
    for rank in range(2, top_k + 1):
        header += [f"label_{rank}", f"score_{rank}"]
    routed = any(p.route_score is not None for p in predictions)
    if routed:
        header.append("route_score")
    out = Path(out)
    with atomic_path(out) as temp:
        with temp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for p in predictions:
                row: list[str] = [str(p.path), p.task]
                for rank in range(top_k):
                    if rank < len(p.labels):
                        row += [p.labels[rank], f"{p.scores[rank]:.6f}"]
                    else:
                        row += ["", ""]
                if routed:
                    row.append("" if p.route_score is None else f"{p.route_score:.6f}")
                writer.writerow(row)
    return out
