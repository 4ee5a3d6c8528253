"""Exact magnitude selection over a streamed tensor: the k-th largest |delta| per agent.

TIES keeps each task vector's top ``keep`` fraction per tensor, breadcrumbs a band below its top
``gamma``; both need exact per-agent thresholds over tensors of any size, found here while
holding one chunk at a time (a radix select, equal to ``torch.kthvalue`` over the whole tensor).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

from ram_trl.methods.base import TensorStream

_BUCKETS = 1 << 16


def trim_count(numel: int, keep: float) -> int:
    """How many elements of a tensor TIES keeps: at least ``keep * numel`` (never rounds a small
    tensor down to nothing)."""
    return min(numel, math.ceil(keep * numel - 1e-9))


def kth_magnitude(tensor: TensorStream, k: int) -> torch.Tensor:
    """Per agent, the exact k-th largest ``|delta|`` of a streamed tensor (float32, on its
    device): the bound a magnitude trim keeps above; ``inf`` when ``k <= 0`` (nothing kept)."""
    values = kth_largest(tensor.magnitudes(), k) if k > 0 else [math.inf] * len(tensor.agents)
    return torch.tensor(values, dtype=torch.float32, device=tensor.device)


def kth_largest(chunks: Callable[[], Iterable[tuple[torch.Tensor, int]]], k: int) -> list[float]:
    """Per row, the exact k-th largest of non-negative float32 values streamed in chunks.

    ``chunks`` yields ``(values, zeros)``: ``(R, m)`` values (one row per agent) plus ``zeros``
    more implicit zeros per row (the engine materializes only the elements some agent changed).
    It is called once per sweep and must yield the same each time. A one-element list is
    selected in memory. Otherwise, since non-negative IEEE-754 floats sort like their bit
    patterns, a radix select over two 16-bit histograms finds the exact value while holding one
    chunk at a time: TIES trimming of a tensor of any size, with the same result as
    ``torch.kthvalue`` over all of it.
    """
    first = chunks()
    if isinstance(first, Sequence) and len(first) == 1:  # one chunk in memory: no sweeps
        return _kth_largest_in_memory(*first[0], k)
    high: torch.Tensor | None = None
    for values, zeros in chunks():
        high = _histograms(_bits(values) >> 16, high, zeros)
    if k <= 0 or high is None:
        return [math.inf] * (0 if high is None else high.shape[0])
    picks = [_select_from_top(row, k) for row in high]
    low: torch.Tensor | None = None
    for values, zeros in chunks():
        bits = _bits(values)
        rows = [
            row[(row >> 16) == bucket] & 0xFFFF
            for row, (bucket, _) in zip(bits, picks, strict=True)
        ]
        low = _histograms(rows, low, 0)
        for r, (bucket, _) in enumerate(picks):
            if bucket == 0:  # implicit zeros have all-zero bits
                low[r, 0] += zeros
    assert low is not None
    result = []
    for row, (bucket, rank) in zip(low, picks, strict=True):
        rest, _ = _select_from_top(row, rank)
        word = torch.tensor([bucket << 16 | rest], dtype=torch.int32)
        result.append(word.view(torch.float32).item())
    return result


def _kth_largest_in_memory(values: torch.Tensor, zeros: int, k: int) -> list[float]:
    rows = values.reshape(values.shape[0], -1)
    if k <= 0:
        return [math.inf] * rows.shape[0]
    if k > rows.shape[1]:  # among the implicit zeros (or past the end)
        return [0.0] * rows.shape[0]
    return rows.kthvalue(rows.shape[1] - k + 1, dim=1).values.tolist()


def _bits(values: torch.Tensor) -> torch.Tensor:
    return values.detach().float().cpu().reshape(values.shape[0], -1).view(torch.int32).long()


def _histograms(
    rows: Iterable[torch.Tensor], into: torch.Tensor | None, zeros: int
) -> torch.Tensor:
    counts = torch.stack([torch.bincount(row, minlength=_BUCKETS) for row in rows])
    counts[:, 0] += zeros
    return counts if into is None else into + counts


def _select_from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest element, and that element's rank inside it."""
    from_top = hist.flip(0).cumsum(0)
    k = min(k, int(from_top[-1]))
    index = int(torch.searchsorted(from_top, k))
    before = int(from_top[index - 1]) if index else 0
    return _BUCKETS - 1 - index, k - before
