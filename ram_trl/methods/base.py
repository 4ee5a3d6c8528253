"""What a merge method is: a per-chunk rule, its parameters, and the preparation it needs.

The engine streams a model tensor by tensor and, within a tensor, row chunk by row chunk. A
method takes part at three points, and only there:

1. :meth:`MergeMethod.prepare_model`, once, before anything is merged: whole-model statistics
   (RAM+'s rho counts shared and unique elements over the whole model). A method that needs the
   agents' overlap counts says so with ``needs_counts``; the engine then makes a counting pass
   first and hands them in as :class:`OverlapCounts`.
2. :meth:`MergeMethod.prepare_tensor`, per floating-point tensor: yields the tensor's chunks,
   each with the :class:`ChunkContext` its rule needs (TIES sweeps the tensor for its trim
   thresholds first; DARE derives a seed per chunk and reads every element).
3. :meth:`MergeMethod.rule`, per chunk: the stacked float32 task vectors ``deltas`` of shape
   ``(N, n)`` (one row per agent, in a fixed agent order) -> the merged task vector ``(n,)``.

Rules and hooks never do I/O (the tensor a hook sees streams itself), so they are tested by hand
and run on any device. Adding a method means subclassing :class:`MergeMethod` (or giving it a rule
function) and calling :func:`register`, in this package alone. Imports: torch, ram_trl.errors
(and, for RAM's compiled rule, ram_trl.native).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ram_trl.errors import InputError
from ram_trl.validation import check_fields

#: The paper's change threshold: an element counts as changed iff ``|tau| > 1e-5`` (strict).
CHANGE_EPSILON = 1e-5


def compared_base(base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base as an agent stored in ``dtype`` is compared with: rounded to ``dtype`` when that
    is a narrower float (a bf16 checkpoint of a float32 base), else the base itself.

    An agent saved at a lower precision differs from the wider base at almost every element by
    rounding alone; counted as changes, that noise would be merged into the model. Compared at
    the precision both share, an element the agent did not change is unchanged, and keeps the
    base's value bit for bit. One rule for the merge and for snapshots."""
    narrower = dtype.is_floating_point and base.dtype.is_floating_point
    if narrower and dtype.itemsize < base.dtype.itemsize:
        return base.to(dtype)
    return base


@dataclass(frozen=True)
class ChunkContext:
    """What a rule needs besides the deltas, prepared by its method for one chunk."""

    #: per-agent scale applied to unique elements (RAM family); ``None`` when unused
    scales: torch.Tensor | None = None
    #: per-agent lower magnitude bound of the elements kept (TIES, breadcrumbs)
    thresholds: torch.Tensor | None = None
    #: per-agent seeds for random dropping (DARE), stable across chunking and agent order
    seeds: tuple[int, ...] = ()
    #: per-agent upper magnitude bound of the elements kept (breadcrumbs)
    ceilings: torch.Tensor | None = None


@dataclass(frozen=True)
class OverlapCounts:
    """The counting pass's result: per floating-point tensor, the agents' overlap histogram
    ``H[t, k]`` (elements agent t changed that exactly k other agents changed too; see
    :func:`~ram_trl.methods.ram.overlap_histogram`). Histograms of tensors add up."""

    agents: int
    tensors: Mapping[str, torch.Tensor]

    def whole(self) -> torch.Tensor:
        """The whole model's histogram ``(N, N)``."""
        zeros = torch.zeros((self.agents, self.agents), dtype=torch.int64)
        return sum(self.tensors.values(), zeros)


@dataclass(frozen=True)
class ModelPlan:
    """What a method decided from whole-model statistics, before merging anything."""

    #: per tensor, the per-agent scale of unique deltas (float32, as the rule applies it)
    scales: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: the whole model's per-agent scale (float64), reported as each agent's lambda
    lambdas: torch.Tensor | None = None
    #: ``scales`` differ from tensor to tensor (RAM+ with ``rho_scope="tensor"``)
    per_tensor: bool = False


class Chunk(Protocol):
    """A chunk as the engine reads it (``ram_trl.merging.chunks.Chunk``)."""

    start: int  # first row
    deltas: torch.Tensor  # (N, m) float32

    @property
    def numel(self) -> int: ...


class TensorStream(Protocol):
    """One floating-point tensor of a merge, as :meth:`MergeMethod.prepare_tensor` sees it
    (``ram_trl.merging.chunks.TensorView``)."""

    name: str
    numel: int
    agents: list[str]
    device: torch.device

    def chunks(self, *, sparse: bool = True) -> Iterable[Chunk]:
        """The tensor's chunks, in order. ``sparse``: only the elements some agent changed are
        materialized (the rest are exactly zero in every delta); ``False`` for rules that look
        at every element."""
        ...

    def magnitudes(self) -> Callable[[], Iterable[tuple[torch.Tensor, int]]]:
        """Sweeps over the tensor for :func:`~ram_trl.methods.magnitude.kth_largest`: each
        yields ``(|deltas| (N, m), implicit zeros per row)`` chunk by chunk."""
        ...


Rule = Callable[[torch.Tensor, Any, ChunkContext], torch.Tensor]
RuleAt = Callable[
    [Sequence[tuple[torch.Tensor, torch.Tensor]], int, Any, ChunkContext],
    list[tuple[torch.Tensor | None, torch.Tensor]],
]


class MergeMethod:
    """A registered merge method: name, parameter dataclass, one-line summary, rule and hooks.

    Subclasses override the hooks they need (see the module docstring); a method whose rule
    needs nothing but the deltas is just ``MergeMethod(name, params, summary, rule)``.
    """

    #: whether :meth:`prepare_model` needs the overlap counts (a counting pass first)
    needs_counts: bool = False
    #: per-agent unique-delta scales from overlap counts, ``(histogram (N, N), params) -> (N,)``
    #: (the RAM family's lambda); ``None`` for methods that do not scale unique deltas
    scales: Callable[[torch.Tensor, Any], torch.Tensor] | None = None
    #: the rule from each agent's changed positions instead of dense deltas, for chunks of
    #: sparse snapshots: ``(changes [(positions, float32 deltas)] per agent, numel, params,
    #: ctx) -> per agent (keep, merged)``: the merged deltas at the positions agent t changed
    #: (``keep`` indexes its changes; None: all of them), the numbers :meth:`rule` gives, a
    #: shared position given the same bits by each of its agents; ``None`` when the method
    #: has none (its chunks then come with dense deltas)
    rule_at: RuleAt | None = None
    #: ``rule_at`` applied, in one compiled pass: ``(chunk of snapshots, params, ctx, output
    #: dtype, out=None) -> the output rows`` (the base with the merged deltas added, the bits
    #: ``rule_at`` gives; written into ``out`` when given), or None where it does not apply or
    #: found something wrong: then ``rule_at`` runs, and says what. ``None`` for methods
    #: without one
    merge_stored: Callable[..., torch.Tensor | None] | None = None
    #: the rule in two steps, for methods whose whole-model statistics only scale the agents'
    #: unique deltas (the RAM family): ``(deltas, params) -> (merged deltas with every scale 1,
    #: owners)``, run while counting; :meth:`rescale` of that, once the counts are known, is
    #: :meth:`rule`'s result bit for bit (a one-pass merge). ``None``: no such split
    unscaled_rule: Callable[[torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __init__(self, name: str, params: type, summary: str, rule: Rule | None = None) -> None:
        self.name, self.params, self.summary = name, params, summary
        self._rule = rule

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

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
        check_fields(self.params, values, f"method {self.name!r}")
        return self.params(**values)

    def change_epsilon(self, params: Any) -> float | None:
        """The threshold of this method's change mask (its ``epsilon`` parameter), or ``None``
        for a method without one (TIES, DARE... ignore RAM's mask)."""
        return getattr(params, "epsilon", None)

    def prepare_model(self, params: Any, counts: OverlapCounts | None) -> ModelPlan:
        """Once per merge, before any tensor: decide what needs the whole model."""
        return ModelPlan()

    def prepare_tensor(
        self, params: Any, plan: ModelPlan, tensor: TensorStream
    ) -> Iterator[tuple[Chunk, ChunkContext]]:
        """Per floating-point tensor: its chunks, each with the context of its rule."""
        return each_chunk(tensor, ChunkContext())

    def rescale(
        self, merged: torch.Tensor, owners: torch.Tensor, plan: ModelPlan, name: str
    ) -> torch.Tensor:
        """Per chunk of tensor ``name``: :attr:`unscaled_rule`'s result with the plan's scales."""
        raise NotImplementedError(f"{type(self).__name__} has no unscaled_rule")

    def rule(self, deltas: torch.Tensor, params: Any, ctx: ChunkContext) -> torch.Tensor:
        """Per chunk: the merged task vector ``(n,)`` of ``deltas`` ``(N, n)``."""
        if self._rule is None:
            raise NotImplementedError(f"{type(self).__name__} defines no rule")
        return self._rule(deltas, params, ctx)


def agent_sum(deltas: torch.Tensor) -> torch.Tensor:
    """``deltas.sum(0)`` over the agents ``(N, n) -> (n,)``, added one agent at a time in agent
    order. torch orders a sum over 5 or more rows by the tensor's width, so an element's sum
    would depend on how many other elements share its chunk (a checkpoint's candidates, a
    snapshot's union, the chunk size); in agent order it never does, and for up to 4 agents it
    is the very same float32 sum."""
    if deltas.shape[0] == 0:
        return deltas.sum(0)
    total = deltas[0].clone()
    for row in deltas[1:]:
        total += row
    return total


def each_chunk(
    tensor: TensorStream, context: ChunkContext, *, sparse: bool = True
) -> Iterator[tuple[Chunk, ChunkContext]]:
    """Every chunk of ``tensor`` with one context: what most ``prepare_tensor`` hooks return."""
    for chunk in tensor.chunks(sparse=sparse):
        yield chunk, context


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
    """Raise an InputError unless ``value`` is a finite number (not a bool: YAML's ``yes`` is
    one) with ``lo <= value <= hi`` (or ``< hi`` when ``hi_open``). An infinite bound is open:
    ``r=inf`` or ``scale=inf`` would make every merged weight infinite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{method}: parameter {name}={value!r} must be a number")
    if not math.isfinite(value):
        raise InputError(f"{method}: parameter {name}={value!r} must be finite")
    if not (lo <= value and (value < hi if hi_open else value <= hi)):
        upper = f"< {hi}" if hi_open else f"<= {hi}"
        raise InputError(
            f"{method}: parameter {name}={value!r} is out of range ({lo} <= {name} {upper})"
        )


def check_scale(method: str, scale: float) -> None:
    """The merged delta's ``scale``: any finite number."""
    check_range(method, "scale", scale, -math.inf, math.inf, hi_open=True)
