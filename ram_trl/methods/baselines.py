"""The SFT-style baselines the paper compares against, as rules of the same engine.

- ``linear``: the plain average of the models, base + mean_t tau_t.
- ``task_arithmetic`` (Ilharco et al., 2023): base + scale * sum_t tau_t.
- ``ties`` (Yadav et al., 2023): trim each tau_t to its top ``keep`` fraction by magnitude (per
  tensor, as mergekit does), elect a sign per element by summed mass, average the deltas that
  agree with it ("disjoint mean"), scale.
- ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): drop each delta element with probability
  ``drop``, rescale survivors by 1 / (1 - drop), then task arithmetic or TIES' sign election.

None of them uses RAM's change mask: that is the point of the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ram_trl.errors import InputError
from ram_trl.methods.base import ChunkContext, MergeMethod, check_range, register

_BUCKETS = 1 << 16


def trim_count(numel: int, keep: float) -> int:
    """How many elements of a tensor TIES keeps: at least ``keep * numel`` (never rounds a small
    tensor down to nothing)."""
    return min(numel, math.ceil(keep * numel - 1e-9))


def kth_largest(chunks: Callable[[], Iterable[tuple[torch.Tensor, int]]], k: int) -> list[float]:
    """Per row, the exact k-th largest of non-negative float32 values streamed in chunks.

    ``chunks`` yields ``(values, zeros)``: ``(R, m)`` values (one row per agent) plus ``zeros``
    more implicit zeros per row (the engine only materializes the elements some agent changed).
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


def disjoint_mean(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge: the sign with the larger summed mass wins (ties go to +),
    and the deltas of that sign are averaged; zeros take no part."""
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = torch.sign(deltas) == elected
    return (deltas * agree).sum(0) / agree.sum(0).clamp(min=1)


def dare(deltas: torch.Tensor, drop: float, seeds: tuple[int, ...]) -> torch.Tensor:
    """DARE: drop each element with probability ``drop`` and rescale the rest by 1 / (1 - drop).

    One generator per agent, seeded by the engine from (seed, agent, tensor, chunk), so results
    do not depend on agent order or on which device runs the arithmetic.
    """
    if drop == 0:
        return deltas
    n = deltas.shape[1]
    noise = [torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds]
    keep = torch.stack(noise).to(deltas.device) >= drop
    return deltas * keep / (1 - drop)


def linear_rule(deltas: torch.Tensor, params: LinearParams, ctx: ChunkContext) -> torch.Tensor:
    return deltas.mean(0)


def task_arithmetic_rule(
    deltas: torch.Tensor, params: TaskArithmeticParams, ctx: ChunkContext
) -> torch.Tensor:
    return params.scale * deltas.sum(0)


def ties_rule(deltas: torch.Tensor, params: TiesParams, ctx: ChunkContext) -> torch.Tensor:
    assert ctx.thresholds is not None, "the engine computes TIES thresholds per tensor"
    trimmed = deltas * (deltas.abs() >= ctx.thresholds[:, None])
    return params.scale * disjoint_mean(trimmed)


def dare_linear_rule(deltas: torch.Tensor, params: DareParams, ctx: ChunkContext) -> torch.Tensor:
    return params.scale * dare(deltas, params.drop, ctx.seeds).sum(0)


def dare_ties_rule(deltas: torch.Tensor, params: DareParams, ctx: ChunkContext) -> torch.Tensor:
    return params.scale * disjoint_mean(dare(deltas, params.drop, ctx.seeds))


def _check_scale(method: str, scale: float) -> None:
    check_range(method, "scale", scale, -math.inf, math.inf, hi_open=True)


@dataclass(frozen=True)
class LinearParams:
    pass


@dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check_scale("task_arithmetic", self.scale)


@dataclass(frozen=True)
class TiesParams:
    keep: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("ties", "keep", self.keep, 0.0, 1.0)
        _check_scale("ties", self.scale)


@dataclass(frozen=True)
class DareParams:
    drop: float = 0.9
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("dare", "drop", self.drop, 0.0, 1.0, hi_open=True)
        _check_scale("dare", self.scale)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"dare: parameter seed={self.seed!r} must be an integer")


register(MergeMethod("linear", linear_rule, LinearParams, "plain average of the models"))
register(
    MergeMethod(
        "task_arithmetic", task_arithmetic_rule, TaskArithmeticParams, "base + scale * sum tau_t"
    )
)
register(
    MergeMethod(
        "ties", ties_rule, TiesParams, "trim to top keep, elect sign, disjoint mean", trims=True
    )
)
register(
    MergeMethod(
        "dare_linear", dare_linear_rule, DareParams, "random drop + rescale, sum", random=True
    )
)
register(
    MergeMethod(
        "dare_ties", dare_ties_rule, DareParams, "random drop + rescale, TIES sign", random=True
    )
)
