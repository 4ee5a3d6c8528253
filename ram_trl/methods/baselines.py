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

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ram_trl.errors import InputError
from ram_trl.methods.base import (
    Chunk,
    ChunkContext,
    MergeMethod,
    ModelPlan,
    TensorStream,
    agent_sum,
    check_range,
    check_scale,
    each_chunk,
    register,
)
from ram_trl.methods.magnitude import kth_magnitude, trim_count


def disjoint_mean(deltas: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge: the sign with the larger summed mass wins (ties go to +),
    and the deltas of that sign are averaged; zeros take no part."""
    elected = torch.where(agent_sum(deltas) >= 0, 1.0, -1.0).to(deltas.dtype)
    agree = torch.sign(deltas) == elected
    return agent_sum(deltas * agree) / agree.sum(0).clamp(min=1)


def dare(deltas: torch.Tensor, drop: float, seeds: tuple[int, ...]) -> torch.Tensor:
    """DARE: drop each element with probability ``drop`` and rescale the rest by 1 / (1 - drop).

    One generator per agent, seeded from (seed, agent, tensor, chunk) by :func:`chunk_seeds`, so
    results do not depend on agent order or on which device runs the arithmetic.
    """
    if drop == 0:
        return deltas
    n = deltas.shape[1]
    noise = [torch.rand(n, generator=torch.Generator().manual_seed(s)) for s in seeds]
    keep = torch.stack(noise).to(deltas.device) >= drop
    return deltas * keep / (1 - drop)


def chunk_seeds(seed: int, agents: list[str], tensor: str, start: int) -> tuple[int, ...]:
    """DARE's per-agent seeds for the chunk of ``tensor`` starting at row ``start``: a hash of
    (seed, agent, tensor, chunk), reproducible and independent of agent order and device."""

    def one(agent: str) -> int:
        key = f"{seed}\0{agent}\0{tensor}\0{start}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1

    return tuple(one(agent) for agent in agents)


def linear_rule(deltas: torch.Tensor, params: LinearParams, ctx: ChunkContext) -> torch.Tensor:
    return agent_sum(deltas) / deltas.shape[0]


def task_arithmetic_rule(
    deltas: torch.Tensor, params: TaskArithmeticParams, ctx: ChunkContext
) -> torch.Tensor:
    return params.scale * agent_sum(deltas)


def ties_rule(deltas: torch.Tensor, params: TiesParams, ctx: ChunkContext) -> torch.Tensor:
    assert ctx.thresholds is not None, "TiesMerge.prepare_tensor computes them per tensor"
    trimmed = deltas * (deltas.abs() >= ctx.thresholds[:, None])
    return params.scale * disjoint_mean(trimmed)


def dare_linear_rule(deltas: torch.Tensor, params: DareParams, ctx: ChunkContext) -> torch.Tensor:
    return params.scale * agent_sum(dare(deltas, params.drop, ctx.seeds))


def dare_ties_rule(deltas: torch.Tensor, params: DareParams, ctx: ChunkContext) -> torch.Tensor:
    return params.scale * disjoint_mean(dare(deltas, params.drop, ctx.seeds))


@dataclass(frozen=True)
class LinearParams:
    pass


@dataclass(frozen=True)
class TaskArithmeticParams:
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_scale("task_arithmetic", self.scale)


@dataclass(frozen=True)
class TiesParams:
    keep: float = 0.2
    scale: float = 1.0

    def __post_init__(self) -> None:
        check_range("ties", "keep", self.keep, 0.0, 1.0)
        check_scale("ties", self.scale)


@dataclass(frozen=True)
class DareParams:
    drop: float = 0.9
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("dare", "drop", self.drop, 0.0, 1.0, hi_open=True)
        check_scale("dare", self.scale)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InputError(f"dare: parameter seed={self.seed!r} must be an integer")


class TiesMerge(MergeMethod):
    """TIES: per tensor, each agent's trim threshold is the exact k-th largest |delta| with
    ``k = trim_count(numel, keep)`` (a tensor larger than one chunk is swept twice for it)."""

    def prepare_tensor(
        self, params: TiesParams, plan: ModelPlan, tensor: TensorStream
    ) -> Iterator[tuple[Chunk, ChunkContext]]:
        k = trim_count(tensor.numel, params.keep)
        return each_chunk(tensor, ChunkContext(thresholds=kth_magnitude(tensor, k)))


class DareMerge(MergeMethod):
    """DARE: a seed per agent and chunk, and every element read (each draws a random number)."""

    def prepare_tensor(
        self, params: DareParams, plan: ModelPlan, tensor: TensorStream
    ) -> Iterator[tuple[Chunk, ChunkContext]]:
        for chunk in tensor.chunks(sparse=False):
            seeds = chunk_seeds(params.seed, tensor.agents, tensor.name, chunk.start)
            yield chunk, ChunkContext(seeds=seeds)


register(MergeMethod("linear", LinearParams, "plain average of the models", linear_rule))
register(
    MergeMethod(
        "task_arithmetic", TaskArithmeticParams, "base + scale * sum tau_t", task_arithmetic_rule
    )
)
register(TiesMerge("ties", TiesParams, "trim to top keep, elect sign, disjoint mean", ties_rule))
register(DareMerge("dare_linear", DareParams, "random drop + rescale, sum", dare_linear_rule))
register(DareMerge("dare_ties", DareParams, "random drop + rescale, TIES sign", dare_ties_rule))
