"""Reinforced Agent Merging (Yuan et al., arXiv 2601.13572): RAM, RAM+, RAM+s and the authors'
``arm-r-v2`` preset.

Per element i, with T_i the agents whose change mask m_t = |tau_t| > epsilon is set (Eq. 1):
unchanged (|T_i| = 0) stays at base, unique (T_i = {t}) gets lambda_t * tau_t, shared
(|T_i| >= 2) gets the plain mean of the changing agents' deltas (Eq. 7). The variants differ only
in lambda_t, which depends on mask *counts* (never magnitudes) through the overlap-unique ratio
rho_t = (t's shared elements) / (t's unique elements) (Eq. 2), counted over the whole model by
default (``rho_scope="global"``) or per tensor (``"tensor"``, mergekit's ``ramplus_tl``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ram_trl import native
from ram_trl.errors import InputError
from ram_trl.methods.base import (
    CHANGE_EPSILON,
    Chunk,
    ChunkContext,
    MergeMethod,
    ModelPlan,
    OverlapCounts,
    TensorStream,
    agent_sum,
    check_range,
    each_chunk,
    register,
)

RHO_SCOPES = ("global", "tensor")


def change_mask(deltas: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Eq. 1: an element counts as changed iff ``|tau| > epsilon`` (strict, in float32)."""
    return deltas.abs() > epsilon


def kept_changes(deltas: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``torch.where(change_mask(deltas, epsilon), deltas, 0.0)`` for finite deltas, bit for
    bit, +0.0 where unchanged: ``hardshrink`` makes the same strict float32 comparison, about
    20x faster than ``where`` on the random masks of RL task vectors."""
    return torch.nn.functional.hardshrink(deltas, epsilon)


def overlap_histogram(mask: torch.Tensor) -> torch.Tensor:
    """``H[t, k]`` = how many elements agent t changed that exactly k other agents changed too.

    ``mask`` is ``(N, n)`` bool. Row sums are the changed counts; ``H[:, 0]`` are the unique
    counts and ``H[:, 1:].sum(1)`` the shared counts, which is all that rho needs. Histograms of
    chunks and tensors add up, so one pass over the model gives both scopes and the probe.
    """
    n_agents = mask.shape[0]
    if n_agents == 0:
        return torch.zeros((0, 0), dtype=torch.int64)
    count = _count(mask)
    # one bincount per agent of how many changed each of its elements (0 where it did not):
    # about 3x faster than a masked sum per k
    rows = [torch.bincount(count * changed, minlength=n_agents + 1) for changed in mask]
    return torch.stack(rows)[:, 1:]


def overlap_histogram_at(
    changed: Sequence[torch.Tensor], numel: int, *, shift: int = 0
) -> torch.Tensor:
    """:func:`overlap_histogram` of a chunk of ``numel`` elements given, per agent, the positions
    it changed (distinct, increasing, plus ``shift``: int32 or int64 stored indices) instead of
    the whole mask: the same integers, in work proportional to the changes (the counting pass
    of sparse snapshots). Counted by the compiled kernel when there is one."""
    n_agents = len(changed)
    if n_agents == 0:
        return torch.zeros((0, 0), dtype=torch.int64)
    lib = native.library()
    if lib is not None and native.indexable(changed):
        hist = native.count_at(lib, numel, changed, shift)
        if hist is not None:
            return hist
    if shift or any(p.dtype != torch.int64 for p in changed):
        changed = [p.to(torch.int64) - shift for p in changed]
    count, _, ones = _scratch(numel, n_agents)
    try:
        for positions in changed:
            count.index_add_(0, positions, ones[: positions.numel()])
        rows = [
            torch.bincount(count.index_select(0, positions), minlength=n_agents + 1)
            for positions in changed
        ]
    finally:  # a memset of a chunk in cache costs less than clearing where it was touched
        count.zero_()
    return torch.stack(rows)[:, 1 : n_agents + 1]


def _count(mask: torch.Tensor) -> torch.Tensor:
    """How many agents changed each element (a small integer type: it is computed per chunk)."""
    return mask.sum(0, dtype=torch.uint8 if mask.shape[0] < 255 else torch.int32)


def shared_unique(hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-agent (shared, unique) element counts from an overlap histogram."""
    return hist[:, 1:].sum(1), hist[:, 0]


def overlap_ratio(hist: torch.Tensor) -> torch.Tensor:
    """Eq. 2: rho_t = shared_t / unique_t (float64). ``inf`` when t has shared but no unique
    elements (the paper leaves it undefined), 0 when t changed nothing."""
    shared, unique = (x.to(torch.float64) for x in shared_unique(hist))
    rho = shared / unique
    return torch.where((shared == 0) & (unique == 0), torch.zeros_like(rho), rho)


def _no_unique_is_one(hist: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    # An agent without unique elements has an undefined rho, and its lambda scales nothing:
    # report it as 1 instead of crashing (the authors' script divides by zero here).
    return torch.where(hist[:, 0] == 0, torch.ones_like(lam), lam)


def ram_plus_scales(hist: torch.Tensor, params: RAMPlusParams) -> torch.Tensor:
    """Eq. 6: lambda_t = 1 + r * clip(rho_t, 0, alpha)."""
    rho = overlap_ratio(hist)
    return _no_unique_is_one(hist, 1 + params.r * rho.clamp(0, params.alpha))


def ram_plus_s_scales(hist: torch.Tensor, params: RAMPlusSParams) -> torch.Tensor:
    """Eq. 8 (App. E): lambda_t = 1 + r * rho_t / (1 + rho_t) = 1 + r * shared_t / changed_t."""
    shared, unique = (x.to(torch.float64) for x in shared_unique(hist))
    shared_fraction = shared / (shared + unique).clamp(min=1)
    return _no_unique_is_one(hist, 1 + params.r * shared_fraction)


def arm_r_v2_scales(hist: torch.Tensor, params: ArmRV2Params) -> torch.Tensor:
    """The authors' ``ram-main.py --merge_mode arm-r-v2``: lambda_t = 1 + (r - 1) * min(1, rho_t),
    with r <= 1 treated as 1 (their r = 1.1 is the paper's r = 0.1, with alpha effectively 1)."""
    rho = overlap_ratio(hist)
    return _no_unique_is_one(hist, 1 + (max(params.r, 1.0) - 1) * rho.clamp(max=1.0))


def ram_rule(deltas: torch.Tensor, params: RAMParams, ctx: ChunkContext) -> torch.Tensor:
    """Eq. 7: unchanged -> 0, unique -> lambda_t * tau_t, shared -> mean of the changing deltas.

    ``ctx.scales`` holds lambda_t (absent for plain RAM, where lambda = 1).
    """
    if ctx.scales is None:
        return _plain_ram(deltas, params)[0]
    return scale_unique(*ram_rule_unscaled(deltas, params), ctx.scales)


def ram_rule_unscaled(deltas: torch.Tensor, params: RAMParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 with every lambda 1 (plain RAM), and who owns each unique element: ``owners[i]``
    is 1 + the one agent that changed element i, or 0 when none or several did. The lambdas
    multiply nothing else, so :func:`scale_unique` applies them later, once whole-model counts
    are known: a one-pass RAM+ merges while it counts."""
    merged, mask, count = _plain_ram(deltas, params)
    owners = torch.zeros_like(count)
    for t, changed in enumerate(mask):
        owners.add_(changed.to(owners.dtype), alpha=t + 1)
    return merged, owners.mul_((count == 1).to(owners.dtype))


def _plain_ram(
    deltas: torch.Tensor, params: RAMParams
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain RAM's merged deltas, with the change mask and the per-element count behind them."""
    mask = change_mask(deltas, params.epsilon)
    count = _count(mask)
    # Where count <= 1 the sum is the one changing delta (or 0): dividing by 1 keeps it exactly.
    return agent_sum(kept_changes(deltas, params.epsilon)) / count.clamp(min=1), mask, count


def scale_unique(merged: torch.Tensor, owners: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`ram_rule_unscaled`'s merged deltas with the unique ones scaled by their owner's
    lambda: the rule's result bit for bit (a unique element's lambda_t * tau_t is one float32
    product either way; everything else is multiplied by exactly 1)."""
    one = torch.ones(1, dtype=merged.dtype, device=merged.device)
    factors = torch.cat([one, scales.to(merged)])
    return merged * factors.index_select(0, owners.to(torch.int32))


def ram_rule_at(
    changes: Sequence[tuple[torch.Tensor, torch.Tensor]],
    numel: int,
    params: RAMParams,
    ctx: ChunkContext,
) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
    """:func:`ram_rule` from each agent's changes in a chunk of ``numel`` elements, in work
    proportional to them: ``changes[t]`` holds the distinct positions where agent t may differ
    from the base and its float32 deltas there; every other delta is exactly 0. Returns, per
    agent, the merged delta at each position it changed: ``(keep, merged)``, where ``keep``
    indexes agent t's changes (None: all of them) and ``merged`` holds the values there. A
    shared position appears in each of its agents' results with the same value; every position
    no agent changed has merged delta 0.

    The numbers are :func:`ram_rule`'s bit for bit: a unique element's lambda_t * tau_t is one
    float32 product either way (its sum is 0 + tau_t, divided by 1), and a shared element's
    deltas are added in agent order, as :func:`~ram_trl.methods.base.agent_sum` adds them, then
    divided by the same count. Two scratch buffers of ``numel`` elements (a counter and the
    sums) are reused per thread, so a chunk small enough to stay in cache never pays for fresh
    memory or a trip to RAM.
    """
    count, total, ones = _scratch(numel, len(changes))
    try:
        kept = []
        for positions, deltas in changes:
            keep = None
            if deltas.numel() and not bool(deltas.abs().min() > params.epsilon):
                keep = _flatnonzero(change_mask(deltas, params.epsilon))
                positions, deltas = positions.index_select(0, keep), deltas.index_select(0, keep)
            count.index_add_(0, positions, ones[: positions.numel()])
            total.index_add_(0, positions, deltas)  # in agent order, from +0: agent_sum's sum
            kept.append((keep, positions))
        merged, factors = [], torch.ones(len(changes) + 1, dtype=torch.float32)
        for t, (keep, positions) in enumerate(kept):
            agents_here = count.index_select(0, positions)
            values = total.index_select(0, positions).div_(agents_here)
            if ctx.scales is not None:  # lambda_t where agent t is alone (count 1), else 1
                factors[1] = ctx.scales[t]
                values.mul_(factors.index_select(0, agents_here.to(torch.int32)))
            merged.append((keep, values))
    finally:  # a memset of a chunk in cache costs less than clearing where it was touched
        count.zero_()
        total.zero_()
    return merged


def ram_merge_stored(
    chunk: Any,
    params: RAMParams,
    ctx: ChunkContext,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """:func:`ram_rule_at` applied to a chunk of snapshots (``chunk``: the base's rows, each
    agent's stored indices, values and epsilon, see ``ram_trl.merging.chunks.StoredChunk``),
    in one compiled pass: the output rows in ``dtype`` (written into ``out`` when given), the
    bits that ``rule_at`` and applying its result give. None when the compiled kernel is not
    there or does not apply (another output dtype, 255 agents or more) or found something
    wrong (a non-finite value, a damaged snapshot): then ``rule_at`` runs, and says what."""
    lib = native.library()
    base = chunk.base
    if lib is None or dtype != base.dtype or base.dtype not in native.DTYPES:
        return None
    if base.device.type != "cpu" or not base.is_contiguous():
        return None
    if not native.indexable(chunk.indices) or not all(
        v.dtype == base.dtype and v.is_contiguous() and v.numel() == i.numel()
        for i, v in zip(chunk.indices, chunk.values, strict=True)
    ):
        return None
    n = len(chunk.indices)
    lambdas = [1.0] * n if ctx.scales is None else ctx.scales.tolist()
    out = torch.empty_like(base) if out is None else out
    status = native.merge_at(
        lib, base, out, chunk.indices, chunk.shift, chunk.values, lambdas, chunk.epsilons,
        params.epsilon,
    )  # fmt: skip
    return out if status == 0 else None


_SCRATCH = threading.local()


def _scratch(numel: int, agents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A zeroed per-element counter (uint8 below 255 agents), zeroed float32 sums and ones to
    count with, for a chunk of ``numel`` elements: reused by each thread, which zeroes them
    again when done (fresh memory costs a page fault per page, and the changes of an RL agent
    touch nearly every page)."""
    have = getattr(_SCRATCH, "buffers", None)
    if have is None or have[0].numel() < numel:
        count, ones = torch.zeros(numel, dtype=torch.uint8), torch.ones(numel, dtype=torch.uint8)
        have = (count, torch.zeros(numel), ones)
        _SCRATCH.buffers = have
    if agents >= 255:
        ones = torch.ones(numel, dtype=torch.int32)
        return torch.zeros(numel, dtype=torch.int32), have[1][:numel], ones
    return have[0][:numel], have[1][:numel], have[2][:numel]


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions where ``mask`` is set (int64): numpy's is several times faster than torch's."""
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _validate(method: str, params: object) -> None:
    """The checks every RAM-family parameter set shares: r, alpha, epsilon >= 0, a known scope."""
    for name in ("r", "alpha", "epsilon"):
        if hasattr(params, name):
            check_range(method, name, getattr(params, name), 0.0, math.inf)
    scope = getattr(params, "rho_scope", "global")
    if scope not in RHO_SCOPES:
        raise InputError(f"{method}: rho_scope={scope!r} must be one of {', '.join(RHO_SCOPES)}")


@dataclass(frozen=True)
class RAMParams:
    epsilon: float = CHANGE_EPSILON

    def __post_init__(self) -> None:
        _validate("ram", self)


@dataclass(frozen=True)
class RAMPlusParams:
    r: float = 0.1
    alpha: float = 2.0
    epsilon: float = CHANGE_EPSILON
    rho_scope: str = "global"

    def __post_init__(self) -> None:
        _validate("ram_plus", self)


@dataclass(frozen=True)
class RAMPlusSParams:
    r: float = 0.1
    epsilon: float = CHANGE_EPSILON
    rho_scope: str = "global"

    def __post_init__(self) -> None:
        _validate("ram_plus_s", self)


@dataclass(frozen=True)
class ArmRV2Params:
    r: float = 1.1
    epsilon: float = CHANGE_EPSILON
    rho_scope: str = "global"

    def __post_init__(self) -> None:
        _validate("arm_r_v2", self)


class RAMMerge(MergeMethod):
    """The RAM family: Eq. 7 per chunk; lambda_t from overlap counts (``scales``), over the whole
    model or per tensor (``rho_scope``), decided once before merging."""

    rule_at = staticmethod(ram_rule_at)
    merge_stored = staticmethod(ram_merge_stored)
    unscaled_rule = staticmethod(ram_rule_unscaled)

    def __init__(self, name: str, params: type, summary: str, scales: Any | None = None) -> None:
        super().__init__(name, params, summary, ram_rule)
        self.scales = scales
        self.needs_counts = scales is not None

    def prepare_model(self, params: Any, counts: OverlapCounts | None) -> ModelPlan:
        if self.scales is None or counts is None:
            return ModelPlan()
        lambdas = self.scales(counts.whole(), params)
        if params.rho_scope == "tensor":
            tensors = counts.tensors
            per_tensor = {name: self.scales(h, params).float() for name, h in tensors.items()}
            return ModelPlan(per_tensor, lambdas, per_tensor=True)
        whole_model = lambdas.float()
        return ModelPlan(dict.fromkeys(counts.tensors, whole_model), lambdas)

    def prepare_tensor(
        self, params: Any, plan: ModelPlan, tensor: TensorStream
    ) -> Iterator[tuple[Chunk, ChunkContext]]:
        return each_chunk(tensor, ChunkContext(scales=plan.scales.get(tensor.name)))

    def rescale(
        self, merged: torch.Tensor, owners: torch.Tensor, plan: ModelPlan, name: str
    ) -> torch.Tensor:
        scales = plan.scales.get(name)
        return merged if scales is None else scale_unique(merged, owners, scales)


register(RAMMerge("ram", RAMParams, "RAM: Eq. 7 with lambda = 1"))
register(
    RAMMerge(
        "ram_plus",
        RAMPlusParams,
        "RAM+: unique deltas scaled by 1 + r * clip(rho_t, 0, alpha) (Eq. 6)",
        scales=ram_plus_scales,
    )
)
register(
    RAMMerge(
        "ram_plus_s",
        RAMPlusSParams,
        "RAM+s: unique deltas scaled by 1 + r * rho_t / (1 + rho_t) (Eq. 8)",
        scales=ram_plus_s_scales,
    )
)
register(
    RAMMerge(
        "arm_r_v2",
        ArmRV2Params,
        "the authors' arm-r-v2 preset: 1 + (r - 1) * min(1, rho_t), r = 1.1 means paper r = 0.1",
        scales=arm_r_v2_scales,
    )
)
