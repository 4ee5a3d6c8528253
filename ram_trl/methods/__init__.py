"""Merge methods: per-chunk rules plus the preparation each needs, registered by name.

Owns the paper's rules (:mod:`~ram_trl.methods.ram`), the baselines
(:mod:`~ram_trl.methods.baselines`), Model Breadcrumbs (:mod:`~ram_trl.methods.breadcrumbs`) and
exact magnitude selection (:mod:`~ram_trl.methods.magnitude`); :mod:`~ram_trl.methods.base` says
how a method takes part in a merge. Imports torch, :mod:`ram_trl.errors` and the compiled
kernels of :mod:`ram_trl.native` only: no I/O.
"""

from ram_trl.methods import baselines, breadcrumbs, ram  # noqa: F401  (importing registers them)
from ram_trl.methods.base import (
    CHANGE_EPSILON,
    METHODS,
    ChunkContext,
    MergeMethod,
    ModelPlan,
    OverlapCounts,
    get_method,
    register,
)
from ram_trl.methods.ram import (
    change_mask,
    overlap_histogram,
    overlap_histogram_at,
    overlap_ratio,
    shared_unique,
)

__all__ = [
    "CHANGE_EPSILON",
    "METHODS",
    "ChunkContext",
    "MergeMethod",
    "ModelPlan",
    "OverlapCounts",
    "change_mask",
    "get_method",
    "overlap_histogram",
    "overlap_histogram_at",
    "overlap_ratio",
    "register",
    "shared_unique",
]
