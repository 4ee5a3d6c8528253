"""Row-range reads from any weight source: the one interface every reader of weights offers.

A checkpoint folder (:class:`~ram_trl.io.checkpoint.ModelFolder`), a task-vector snapshot
(``ram_trl.snapshot.TaskVectorSource``) and the live model of a training job all look alike to
whoever reads them: named tensors with a shape and a dtype, read a range of rows (along dim 0) at
a time, so that nothing needs to hold a whole tensor, let alone a whole model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch


class WeightSource(Protocol):
    """Anything weights can be read from, a row range at a time."""

    path: Path
    tensors: Mapping[str, Any]  # name -> a TensorSpec-like object (shape, dtype; file for messages)
    config: dict | None

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor: ...


def row_chunks(shape: tuple[int, ...], chunk_elements: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` along dim 0 holding at most ``chunk_elements`` each, and at
    least one row. A 0-dim tensor is one chunk, ``(0, 1)``."""
    if len(shape) == 0:
        return [(0, 1)]
    rows = shape[0]
    step = max(1, chunk_elements // max(1, math.prod(shape[1:])))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)] or [(0, 0)]


def read_rows(source: WeightSource, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor, or the whole tensor when it is 0-dim."""
    shape = source.tensors[name].shape
    return source.read(name) if len(shape) == 0 else source.read(name, start, stop)
