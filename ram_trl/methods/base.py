"""The merge-method registry: a name maps to a pure per-chunk rule plus its parameter dataclass.

A rule sees one chunk of one tensor: the stacked float32 task vectors ``deltas`` of shape
``(N, n)`` (one row per agent, in a fixed agent order) and a :class:`ChunkContext` holding what
the engine computed beforehand (per-agent scales, trim thresholds, random seeds). It returns the
merged task vector of shape ``(n,)``. Rules never do I/O, so they can be tested by hand and
reused on any device; the engine owns streaming, validation and writing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ram_trl.errors import InputError


@dataclass(frozen=True)
class ChunkContext:
    """What a rule needs besides the deltas, prepared by the engine for one tensor."""

    #: per-agent scale applied to unique elements (RAM family); ``None`` when unused
    scales: torch.Tensor | None = None
    #: per-agent magnitude threshold of TIES trimming for this tensor; ``None`` when unused
    thresholds: torch.Tensor | None = None
    #: per-agent seeds for random dropping (DARE), stable across chunking and agent order
    seeds: tuple[int, ...] = ()


Rule = Callable[[torch.Tensor, Any, ChunkContext], torch.Tensor]
#: ``(histograms (N, N) int64, params) -> per-agent unique scales (N,)`` for the RAM family
ScaleFn = Callable[[torch.Tensor, Any], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method."""

    name: str
    rule: Rule
    params: type
    summary: str
    #: computes per-agent scales from overlap counts; the engine then makes a counting pass first
    scales: ScaleFn | None = None
    #: the rule needs per-tensor TIES trim thresholds (``params.keep``)
    trims: bool = False
    #: the rule draws random numbers (``params.seed``)
    random: bool = False

    @property
    def needs_counts(self) -> bool:
        return self.scales is not None

    def make_params(self, values: Mapping[str, Any] | None = None) -> Any:
        """Build and validate this method's parameters; unknown names are an error."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(
                f"method {self.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                f"its parameters are: {', '.join(sorted(known)) or 'none'}"
            )
        return self.params(**values)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    key = name.replace("-", "_")
    if key not in METHODS:
        raise InputError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[key]


# --- parameter validation helpers shared by the parameter dataclasses -------------------------


def check_range(method: str, name: str, value: float, lo: float, hi: float, *, hi_open=False):
    """Raise an InputError unless ``lo <= value <= hi`` (or ``< hi`` when ``hi_open``)."""
    ok = (
        isinstance(value, (int, float)) and lo <= value and (value < hi if hi_open else value <= hi)
    )
    if not ok:
        upper = f"< {hi}" if hi_open else f"<= {hi}"
        raise InputError(
            f"{method}: parameter {name}={value!r} is out of range ({lo} <= {name} {upper})"
        )


def epsilon_field() -> Any:
    """The paper's change threshold: ``|tau| > 1e-5`` counts as changed (strict)."""
    return field(default=1e-5)
