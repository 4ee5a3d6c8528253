"""Model Breadcrumbs (Davari & Belilovsky, 2023, arXiv 2312.06795), as mergekit's ``breadcrumbs``.

Per tensor and agent, the task vector loses its largest changes (outliers, the top ``gamma``
fraction by magnitude) and its smallest ones, so that a ``density`` fraction of the elements is
kept: the band of ranks ``top + 1 .. top + kept`` by ``|tau|``. The kept deltas are summed and
scaled, like task arithmetic: ``base + scale * sum_t breadcrumbs(tau_t)``.

Counts follow mergekit's ``magnitude_outliers``: ``kept`` elements are kept and ``top`` removed
from the top, fewer when ``gamma`` would not leave room for ``kept`` (``top <= numel - kept``).
Two differences, for streaming: ``kept`` rounds up (:func:`~ram_trl.methods.magnitude.trim_count`,
as TIES does here: a small tensor never loses everything), and the band is cut at exact magnitude
thresholds, so elements tied at a boundary are all kept (mergekit breaks ties by sort order).
With ``gamma=0`` nothing is removed from the top (mergekit's slice keeps nothing there).
Elements no agent changed are zero in every delta and never contribute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ram_trl.methods import base
from ram_trl.methods.base import (
    ChunkContext,
    MergeMethod,
    agent_sum,
    check_range,
    check_scale,
    each_chunk,
)
from ram_trl.methods.magnitude import kth_magnitude, trim_count


@dataclass(frozen=True)
class BreadcrumbsParams:
    """mergekit's defaults for ``gamma``; ``density`` as in its documented example."""

    #: fraction of each tensor's elements kept, per agent
    density: float = 0.9
    #: fraction removed from the top (the largest magnitudes), at most ``1 - density``
    gamma: float = 0.01
    #: scale of the summed kept deltas (mergekit's ``lambda``)
    scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("density", "gamma"):  # fractions of the tensor
            check_range("breadcrumbs", name, getattr(self, name), 0.0, 1.0)
        check_scale("breadcrumbs", self.scale)


def band(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(top, kept)``: how many of a tensor's largest magnitudes are removed, and how many
    elements are kept below them."""
    kept = trim_count(numel, density)
    top = min(math.floor(gamma * numel + 1e-9), numel - kept)
    return top, kept


def breadcrumbs_rule(
    deltas: torch.Tensor, params: BreadcrumbsParams, ctx: ChunkContext
) -> torch.Tensor:
    """``scale * sum_t tau_t``, each agent's delta kept only where ``thresholds_t <= |tau_t| <=
    ceilings_t``."""
    assert ctx.thresholds is not None and ctx.ceilings is not None, "see prepare_tensor"
    size = deltas.abs()
    kept = (size >= ctx.thresholds[:, None]) & (size <= ctx.ceilings[:, None])
    return params.scale * agent_sum(deltas * kept)


class BreadcrumbsMerge(MergeMethod):
    """Per tensor: the band's bounds, exact k-th largest magnitudes of every agent (a tensor
    larger than one chunk is swept four times for them, two per bound)."""

    def prepare_tensor(
        self, params: BreadcrumbsParams, plan: base.ModelPlan, tensor: base.TensorStream
    ) -> Iterator[tuple[base.Chunk, ChunkContext]]:
        top, kept = band(tensor.numel, params.density, params.gamma)
        context = ChunkContext(  # k = 0 gives inf: no lower bound is met, no upper bound cuts
            thresholds=kth_magnitude(tensor, top + kept if kept else 0),
            ceilings=kth_magnitude(tensor, top + 1 if top else 0),
        )
        return each_chunk(tensor, context)


base.register(
    BreadcrumbsMerge(
        "breadcrumbs",
        BreadcrumbsParams,
        "drop each task vector's top gamma and its smallest, keep density, scale * sum",
        breadcrumbs_rule,
    )
)
