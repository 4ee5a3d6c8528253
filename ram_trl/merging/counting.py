"""The counting pass: how many elements each agent changed, alone or with others, per tensor.

One pass over the model gives an overlap histogram per tensor (see
:func:`~ram_trl.methods.ram.overlap_histogram`): what RAM+'s whole-model rho needs before the
first tensor can be merged, what a dry run and ``ram-trl probe`` report, and on the way a check of
every value. :func:`agent_stats` turns the histograms and the method's plan into the report.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch

from ram_trl import threads as worker_threads
from ram_trl.merging import chunks
from ram_trl.merging.chunks import default_threads, read_chunk, row_chunks, stored_changes
from ram_trl.merging.inputs import MergeInputs, is_float_tensor
from ram_trl.merging.report import AgentStats
from ram_trl.merging.spill import Spill, spilled_entry
from ram_trl.methods import (
    ModelPlan,
    OverlapCounts,
    change_mask,
    overlap_histogram,
    overlap_histogram_at,
)
from ram_trl.methods.ram import overlap_ratio, shared_unique

#: a method's ``unscaled_rule`` with its parameters bound: ``deltas -> (merged, owners)``
UnscaledRule = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def count_overlaps(
    inputs: MergeInputs,
    epsilon: float,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "counting",
    names: Collection[str] | None = None,
    threads: int | None = None,
    check_values: bool = True,
    spill: Spill | None = None,
    unscaled: UnscaledRule | None = None,
) -> OverlapCounts:
    """An overlap histogram ``(N, N)`` per floating-point tensor (of ``names`` only, when
    given: a rank's part of a split merge), changes counted as ``|tau| > epsilon``. Also
    validates every value, unless ``check_values`` is False: then chunks of snapshots whose
    stored positions are the change mask are counted from their indices alone
    (:func:`~ram_trl.merging.chunks.stored_changes`), and the merge that follows checks their
    values when it reads them.

    With ``threads`` > 1 (default: :func:`~ram_trl.merging.chunks.default_threads`) chunks are
    read and counted on that many threads, a few ahead of the one being summed: counts are
    integers, so the histograms are the same whatever the order. Chunks whose agents are all
    sparse snapshots of this base are counted from their stored positions alone
    (:func:`stored_deltas`): the same counts, in work proportional to the
    snapshots rather than to the model.

    With a ``spill``, every chunk is also merged by ``unscaled`` (a method's
    ``unscaled_rule``, its parameters bound) and kept there for the merge pass."""
    threads = default_threads() if threads is None else threads
    n = len(inputs.agents)

    def count(name: str, start: int, stop: int) -> tuple[torch.Tensor, Any]:
        numel = (stop - start) * row_numel[name]
        exact = None
        if spill is None and not check_values:
            exact = stored_changes(inputs, name, start, stop, epsilon)
        if exact is not None:  # snapshots taken at this epsilon: their indices are the mask
            indices, shift = exact
            return overlap_histogram_at(indices, numel, shift=shift), None
        stored = None
        if spill is None and epsilon >= 0:
            stored = stored_deltas(inputs, name, start, stop)
        if stored is not None:  # snapshots: only their stored positions are looked at
            changed = [p[change_mask(d, epsilon)] for p, d in stored.changes]  # type: ignore[union-attr]
            return overlap_histogram_at(changed, numel), None
        chunk = read_chunk(inputs, name, start, stop, device)
        hist = overlap_histogram(change_mask(chunk.deltas, epsilon)).cpu()
        if spill is None or unscaled is None:
            return hist, None
        return hist, spilled_entry(chunk.index, *unscaled(chunk.deltas))

    histograms, row_numel = {}, {}
    work = []
    mine = [n for n in inputs.names if names is None or n in names]
    for name in mine:
        info = inputs.base.tensors[name]
        if is_float_tensor(info):
            histograms[name] = torch.zeros((n, n), dtype=torch.int64)
            row_numel[name] = info.numel // max(info.rows, 1)
            work += [(name, start, stop) for start, stop in row_chunks(tuple(info.shape))]
    if threads > 1:
        worker_threads.prepare()
    pool = ThreadPoolExecutor(threads, "ram-trl-count") if threads > 1 else None
    with inputs.progress(progress, desc) as bar, pool or nullcontext():
        tensors = [inputs.base.tensors[name] for name in mine]
        bar.update(sum(i.nbytes for i in tensors if not is_float_tensor(i)))
        parts = _in_order(pool, count, work, 2 * threads)
        for (name, start, stop), (part, merged) in zip(work, parts, strict=True):
            histograms[name] += part
            if merged is not None:
                spill.put(name, start, merged)  # type: ignore[union-attr]
            if stop == inputs.base.tensors[name].rows:
                bar.update(inputs.base.tensors[name].nbytes)
    return OverlapCounts(n, histograms)


def stored_deltas(inputs: MergeInputs, name: str, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of snapshots as a checked :class:`~ram_trl.merging.chunks.
    StoredChunk` with its deltas, or None when some agent is not such a snapshot."""
    chunk = chunks.stored_chunk(inputs, name, start, stop)
    return None if chunk is None else chunks.stored_deltas(inputs, name, chunk)


def _in_order(
    pool: ThreadPoolExecutor | None, fn: Callable[..., Any], items: list[tuple], window: int
) -> Iterator[Any]:
    """``fn(*item)`` for each item, in order, computed on ``pool`` at most ``window`` ahead."""
    if pool is None:
        yield from (fn(*item) for item in items)
        return
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def agent_stats(
    inputs: MergeInputs, counts: OverlapCounts | None, plan: ModelPlan
) -> list[AgentStats]:
    """Per agent: counts over the whole model, rho, and the lambda the plan gives its unique
    elements (1 without scales; per-tensor scales add their ranges). Zero counts when nothing
    was counted."""
    n, total = len(inputs.agents), inputs.float_elements
    lambdas = plan.lambdas if plan.lambdas is not None else torch.ones(n, dtype=torch.float64)
    if counts is None:
        return [
            AgentStats(name, str(source.path), 0, 0, 0, [], None, float(lambdas[t]), total)
            for t, (name, source) in enumerate(inputs.agents.items())
        ]
    hist = counts.whole()
    shared, unique = shared_unique(hist)
    rho = overlap_ratio(hist)
    return [
        AgentStats(
            name=name,
            path=str(source.path),
            changed=int(hist[t].sum()),
            unique=int(unique[t]),
            shared=int(shared[t]),
            overlap=[int(x) for x in hist[t]],
            rho=None if unique[t] == 0 else float(rho[t]),
            lambda_=float(lambdas[t]),
            total=total,
            **(_ranges(counts, plan, t) if plan.per_tensor else {}),
        )
        for t, (name, source) in enumerate(inputs.agents.items())
    ]


def _ranges(counts: OverlapCounts, plan: ModelPlan, t: int) -> dict[str, tuple[float, float]]:
    """(min, max) of agent ``t``'s per-tensor rho and lambda, over the tensors where it has unique
    elements (elsewhere its lambda scales nothing)."""
    rhos, lambdas = [], []
    for name, hist in counts.tensors.items():
        if hist[t, 0] > 0:
            rhos.append(float(overlap_ratio(hist)[t]))
            lambdas.append(float(plan.scales[name][t]))
    if not rhos:
        return {}
    return {"rho_range": (min(rhos), max(rhos)), "lambda_range": (min(lambdas), max(lambdas))}
