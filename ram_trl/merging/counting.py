"""The counting pass: how many elements each agent changed, alone or with others, per tensor.

One pass over the model gives an overlap histogram per tensor (see
:func:`~ram_trl.methods.ram.overlap_histogram`): what RAM+'s whole-model rho needs before the
first tensor can be merged, what a dry run and ``ram-trl probe`` report, and on the way a check of
every value. :func:`agent_stats` turns the histograms and the method's plan into the report.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from ram_trl.merging.chunks import iter_chunks
from ram_trl.merging.inputs import MergeInputs, is_float_tensor
from ram_trl.merging.report import AgentStats
from ram_trl.methods import ModelPlan, OverlapCounts, change_mask, overlap_histogram
from ram_trl.methods.ram import overlap_ratio, shared_unique


def count_overlaps(
    inputs: MergeInputs,
    epsilon: float,
    *,
    device: torch.device | str = "cpu",
    progress: bool = True,
    desc: str = "counting",
    names: Collection[str] | None = None,
) -> OverlapCounts:
    """An overlap histogram ``(N, N)`` per floating-point tensor (of ``names`` only, when
    given: a rank's part of a split merge), changes counted as ``|tau| > epsilon``. Also
    validates every value."""
    histograms = {}
    n = len(inputs.agents)
    with inputs.progress(progress, desc) as bar:
        for name in inputs.names:
            if names is not None and name not in names:
                continue
            info = inputs.base.tensors[name]
            if is_float_tensor(info):
                hist = torch.zeros((n, n), dtype=torch.int64)
                for chunk in iter_chunks(inputs, name, device):
                    hist += overlap_histogram(change_mask(chunk.deltas, epsilon)).cpu()
                histograms[name] = hist
            bar.update(info.nbytes)
    return OverlapCounts(n, histograms)


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
