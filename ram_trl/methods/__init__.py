"""Merge methods: pure per-chunk rules registered by name (see :mod:`ram_trl.methods.base`)."""

from ram_trl.methods import baselines, ram  # noqa: F401  (importing registers the methods)
from ram_trl.methods.base import METHODS, ChunkContext, MergeMethod, get_method, register
from ram_trl.methods.ram import change_mask, overlap_histogram, overlap_ratio, shared_unique

__all__ = [
    "METHODS",
    "ChunkContext",
    "MergeMethod",
    "change_mask",
    "get_method",
    "overlap_histogram",
    "overlap_ratio",
    "register",
    "shared_unique",
]
