"""Streaming a merge's inputs: row chunks of one tensor from every input, as float32 deltas.

Tensor data is read in bounded row chunks (``CHUNK_ELEMENTS`` elements per input), widened to
float32 and turned into task vectors ``tau_t = theta_t - theta_base``, at the elements where some
agent differs from the base (a sparse RL task vector leaves most of them bit-identical) or at all
of them. :class:`TensorView` is one tensor as a merge method's ``prepare_tensor`` hook sees it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ram_trl import native
from ram_trl.errors import InputError
from ram_trl.io import read_rows
from ram_trl.io import row_chunks as _row_chunks
from ram_trl.merging.inputs import MergeInputs
from ram_trl.methods.base import compared_base

#: elements per input read at once: 16 MiB of float32, so N agents need a few hundred MiB at most
CHUNK_ELEMENTS = 1 << 22


def resolve_device(device: str | torch.device) -> torch.device:
    """Where the chunks go and the arithmetic runs; a clear error for a CUDA-less machine."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N or another torch device name"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available here")
    return device


#: chunks are this many times smaller when every agent is a sparse snapshot (1M elements):
#: merging one touches a few scattered elements of every row, and chunks whose scratch buffers
#: stay in cache merge ~25% faster
STORED_CHUNK_DIVISOR = 4


def row_chunks(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """A tensor's row ranges in a merge: at most ``CHUNK_ELEMENTS`` elements per input each."""
    return _row_chunks(shape, CHUNK_ELEMENTS)


def spans(inputs: MergeInputs, name: str, *, stored: bool = False) -> list[tuple[int, int]]:
    """The row ranges a merge reads tensor ``name`` in: :func:`row_chunks`, or, ``stored``
    (the method merges from stored positions) with only snapshots as agents, ranges
    ``STORED_CHUNK_DIVISOR`` times smaller when they are merged on the torch path (the compiled
    one blocks the work itself)."""
    shape = tuple(inputs.base.tensors[name].shape)
    snapshots = all(hasattr(a, "changed_rows") for a in inputs.agents.values())
    if stored and snapshots and native.library() is None:  # torch's scratch stays in cache
        return _row_chunks(shape, max(CHUNK_ELEMENTS // STORED_CHUNK_DIVISOR, 1))
    return row_chunks(shape)


#: above this share of candidate elements a chunk is processed densely (gathers cost more)
SPARSE_LIMIT = 0.25


_BIT_VIEWS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


@dataclass
class Chunk:
    """Rows ``[start, stop)`` of one tensor: the base as stored, and the agents' task vectors at
    ``index`` (float32, ``(N, m)``), the only elements where some agent differs from the base.

    Everywhere else every delta is exactly zero, so no rule changes those elements and they are
    copied from ``base`` bit for bit. ``index`` is None when the chunk is processed densely.
    """

    start: int
    stop: int
    base: torch.Tensor  # (n,) in the stored dtype: a read-only view, never modify in place
    index: torch.Tensor | None
    base32: torch.Tensor  # (m,) float32 at ``index``
    deltas: torch.Tensor  # (N, m) float32 at ``index``

    @property
    def numel(self) -> int:
        return self.base.numel()


@dataclass
class StoredChunk:
    """Rows ``[start, stop)`` of one tensor whose agents are all sparse snapshots of the base:
    the base as stored and, per agent, the flat indices it stores in the tensor (increasing,
    int32 or int64: a position in the chunk plus ``shift``) and its values there, in the
    base's dtype, with the snapshot's own epsilon (``-1.0``: it promises none). Every other
    element is the base's. A method with a ``rule_at`` merges it in work proportional to the
    snapshots: in one compiled pass (``merge_stored``), or from the float32 deltas that
    :func:`stored_deltas` adds (``changes``, per agent its positions in the chunk and deltas
    there; ``base32``, the base's float32 values there)."""

    start: int
    stop: int
    base: torch.Tensor  # (n,) in the stored dtype: a read-only view, never modify in place
    indices: list[torch.Tensor]
    shift: int
    values: list[torch.Tensor]
    epsilons: list[float]
    changes: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    base32: list[torch.Tensor] | None = None

    @property
    def numel(self) -> int:
        return self.base.numel()

    def split(self, parts: int) -> list[StoredChunk]:
        """The chunk as up to ``parts`` chunks of consecutive rows (for as many threads), each
        with its agents' slices of the stored indices; before deltas are added."""
        rows = self.stop - self.start
        row_numel = self.numel // max(rows, 1)
        bounds = sorted({self.start + rows * i // parts for i in range(parts + 1)})
        cuts = [
            np.searchsorted(i.numpy(), [b * row_numel for b in bounds]).tolist()
            for i in self.indices
        ]
        pieces = []
        for k, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
            lo, hi = (start - self.start) * row_numel, (stop - self.start) * row_numel
            pieces.append(
                StoredChunk(
                    start,
                    stop,
                    self.base[lo:hi],
                    [i[c[k] : c[k + 1]] for i, c in zip(self.indices, cuts, strict=True)],
                    start * row_numel,
                    [v[c[k] : c[k + 1]] for v, c in zip(self.values, cuts, strict=True)],
                    self.epsilons,
                )  # fmt: skip
            )
        return pieces


def chunk_at(start: int, stop: int, base: torch.Tensor, index: torch.Tensor) -> Chunk:
    """Rows ``[start, stop)`` of ``base`` (flat) as a :class:`Chunk` at ``index`` (distinct
    positions, any order) without deltas: what a merged delta given there is applied to."""
    base32 = base.index_select(0, index).to(torch.float32)
    return Chunk(start, stop, base, index, base32, torch.empty(0, 0))


def read_chunk(
    inputs: MergeInputs,
    name: str,
    start: int,
    stop: int,
    device: torch.device | str = "cpu",
    *,
    sparse: bool = True,
    stored: bool = False,
) -> Chunk | StoredChunk:
    """Read rows ``[start, stop)`` of a tensor from every input as a :class:`Chunk` (with
    ``stored``, as a :class:`StoredChunk` when every agent is a sparse snapshot of this base
    and the arithmetic runs on the CPU).

    RL task vectors are sparse: most stored elements are bit-identical to the base. When every
    input has the base's dtype, integer views find the elements whose bits differ without
    widening anything, and only those are turned into float32 deltas; a chunk with more than
    ``SPARSE_LIMIT`` of them (or ``sparse=False``, for rules that need every position) is
    processed densely. Either way the deltas are the same float32 numbers, and non-finite base
    or agent values are refused. With a :class:`ReadAhead` open on ``inputs``, the chunk may
    already have been read on its thread.
    """
    ahead = inputs.read_ahead
    if ahead is not None:
        return ahead.read(name, start, stop, device, sparse, stored)
    return _read_chunk(inputs, name, start, stop, device, sparse, stored)


def _read_chunk(
    inputs: MergeInputs,
    name: str,
    start: int,
    stop: int,
    device: torch.device | str,
    sparse: bool,
    stored: bool = False,
) -> Chunk | StoredChunk:
    if stored and sparse and torch.device(device).type == "cpu":
        found = stored_chunk(inputs, name, start, stop)
        if found is not None:
            return found
    base = read_rows(inputs.base, name, start, stop).reshape(-1)
    found = _changed_values(inputs, name, start, stop, base) if sparse else None
    if found is not None:  # sparse sources said where they differ: only those are read
        index, agents, picked = found
    else:
        agents = [read_rows(s, name, start, stop).reshape(-1) for s in inputs.agents.values()]
        index = _candidates(base, agents) if sparse else None
        if index is not None:
            agents = [a.index_select(0, index) for a in agents]
            picked = base.index_select(0, index)
    if index is not None:
        base32 = picked.to(device=device, dtype=torch.float32)
    else:
        base32 = base.to(device=device, dtype=torch.float32)
    deltas = torch.empty((len(agents), base32.numel()), dtype=torch.float32, device=device)
    for row, values in enumerate(agents):
        torch.sub(values.to(device), base32, out=deltas[row])  # widens on the fly
        if values.dtype == base.dtype:
            continue
        at = base if index is None else picked
        reference = compared_base(at, values.dtype)
        if reference is not at:  # a narrower agent: rounding the base is no change
            same = _bits(values) == _bits(reference)
            deltas[row].masked_fill_(same.to(device), 0.0)
    # One float32 reduction is ~20x cheaper than isfinite() on bf16 inputs; a NaN or Inf anywhere
    # makes the sum non-finite (finite weights cannot overflow it), and only then do we look closer.
    # Outside ``index`` agents equal the base bit for bit, so checking the base covers them.
    if (name, start, stop) not in inputs.checked:
        if not torch.isfinite(deltas.sum() + base32.sum()) or (
            index is not None and not finite_bits(base)
        ):
            _report_non_finite(inputs, name, start, stop)
        inputs.checked.add((name, start, stop))
    return Chunk(start, stop, base, index, base32, deltas)


def _candidates(base: torch.Tensor, agents: list[torch.Tensor]) -> torch.Tensor | None:
    """Positions where some agent's stored bits differ from the base's, or None when a dense pass
    is cheaper (many candidates) or impossible (dtypes differ)."""
    view = _BIT_VIEWS.get(base.dtype.itemsize)
    if view is None or not base.dtype.is_floating_point or base.numel() == 0:
        return None
    pairs = []
    for agent in agents:  # bits of each agent against the base at the agent's precision
        reference = compared_base(base, agent.dtype)
        if reference.dtype != agent.dtype or agent.dtype.itemsize not in _BIT_VIEWS:
            return None
        pairs.append((_bits(agent).numpy(), _bits(reference).numpy()))
    index = torch.from_numpy(np.flatnonzero(_differs_anywhere(pairs)))  # 5x torch.nonzero's speed
    return index if index.numel() <= SPARSE_LIMIT * base.numel() else None


#: bytes of each input compared at a time: a block of every input stays in a core's L2 cache
_COMPARE_BLOCK = 512 * 1024


def _differs_anywhere(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Where some pair ``(a, b)`` of equal-length integer arrays has ``a != b``.

    Compared block by block, so the mask being or-ed stays in cache: the comparisons are bound
    by memory bandwidth, and whole-chunk masks (one per agent, each written, then read back)
    took twice as long on the 0.5B benchmark. numpy, as :func:`bits_differ` says, is ~7x torch.
    """
    size = pairs[0][0].size
    block = max(_COMPARE_BLOCK // pairs[0][0].itemsize, 1)
    differs, scratch = np.empty(size, dtype=bool), np.empty(min(block, size), dtype=bool)
    for lo in range(0, size, block):
        hi = min(lo + block, size)
        out, tmp = differs[lo:hi], scratch[: hi - lo]
        np.not_equal(pairs[0][0][lo:hi], pairs[0][1][lo:hi], out=out)
        for a, b in pairs[1:]:
            np.logical_or(out, np.not_equal(a[lo:hi], b[lo:hi], out=tmp), out=out)
    return differs


def _stored_rows(
    inputs: MergeInputs,
    name: str,
    start: int,
    stop: int,
    *,
    values: bool = True,
    absolute: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Every agent's stored positions and values in rows ``[start, stop)`` (``changed_rows``;
    positions only without ``values``; the stored indices as they are with ``absolute``), or
    None when some agent cannot say (a checkpoint, a dense or wider snapshot tensor) or the
    base's dtype has no bit view: then the chunk is read whole."""
    info = inputs.base.tensors[name]
    dtype = info.dtype
    if _BIT_VIEWS.get(dtype.itemsize) is None or not dtype.is_floating_point or not info.numel:
        return None
    stored = []
    for source in inputs.agents.values():
        changed_rows = getattr(source, "changed_rows", None)
        got = None
        if changed_rows is not None:
            kwargs = {"absolute": True} if absolute else {}
            got = changed_rows(name, start, stop, inputs.base, values=values, **kwargs)
        if got is None or (values and got[1].dtype != dtype):
            return None
        stored.append(got)
    return stored


def _row_numel(inputs: MergeInputs, name: str) -> int:
    info = inputs.base.tensors[name]
    return info.numel // max(info.rows, 1)


def _changed_values(
    inputs: MergeInputs, name: str, start: int, stop: int, base: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None:
    """The candidates of a chunk, every agent's values there and the base's, from sources that
    know where they differ from the base (task-vector snapshots: ``changed_rows``), without
    reading their other elements. None when some agent cannot say (a checkpoint, a dense or
    wider snapshot tensor) or when the chunk has too many candidates: then :func:`read_chunk`
    reads it whole.

    The result is exactly :func:`_candidates`' on the rebuilt rows: outside the union of the
    stored positions every agent equals the base bit for bit, and inside it only the positions
    whose bits differ for some agent are kept, so the chunk and the merge are the same bits.
    """
    stored = _stored_rows(inputs, name, start, stop)
    if stored is None:
        return None
    marked, slot, count = _scratch(base.numel())
    for positions, _ in stored:
        marked.index_fill_(0, positions, True)
    index = torch.from_numpy(np.flatnonzero(marked.numpy()))
    slot.index_copy_(0, index, count[: index.numel()])  # position -> its place in ``index``
    picked, agents = base.index_select(0, index), []
    differs = np.zeros(index.numel(), dtype=bool)
    for positions, values in stored:
        place = slot.index_select(0, positions).to(torch.int64)
        agents.append(picked.clone().index_copy_(0, place, values))
        differs |= bits_differ(agents[-1], picked)
    if not differs.all():  # a stored value equal to the base's is no change
        keep = torch.from_numpy(np.flatnonzero(differs))
        index, picked = index[keep], picked[keep]
        agents = [a[keep] for a in agents]
    if index.numel() > SPARSE_LIMIT * base.numel():
        return None
    return index, agents, picked


def stored_chunk(inputs: MergeInputs, name: str, start: int, stop: int) -> StoredChunk | None:
    """Rows ``[start, stop)`` as a :class:`StoredChunk`, from sources that know where they
    differ from the base (``changed_rows``): the base's rows and the stored indices and values
    as they are, nothing computed or checked yet (see :func:`stored_deltas`). None where
    :func:`_changed_values` would not apply (then the caller reads the chunk)."""
    stored = _stored_rows(inputs, name, start, stop, absolute=True)
    if stored is None:
        return None
    base = read_rows(inputs.base, name, start, stop).reshape(-1)
    epsilons = [getattr(s, "epsilon", None) for s in inputs.agents.values()]
    return StoredChunk(
        start, stop, base, [i for i, _ in stored], start * _row_numel(inputs, name),
        [v for _, v in stored], [-1.0 if e is None else float(e) for e in epsilons],
    )  # fmt: skip


def stored_deltas(inputs: MergeInputs, name: str, chunk: StoredChunk) -> StoredChunk:
    """``chunk`` with its float32 deltas (``changes``, ``base32``), the values checked as
    :func:`read_chunk` checks them.

    A chunk's deltas are ``float32(agent) - float32(base)`` at the same positions whichever
    path read them, and exactly 0 elsewhere, so ``|delta| > epsilon`` (epsilon >= 0) marks the
    same elements. Each agent's positions are looked up in the base once; no union, no mask of
    the whole chunk, no agent rows are built.
    """
    if chunk.changes is not None:
        return chunk
    base, start, stop = chunk.base, chunk.start, chunk.stop
    changes, base32 = [], []
    for indices, values in zip(chunk.indices, chunk.values, strict=True):
        positions = indices.to(torch.int64) - chunk.shift
        picked = base.index_select(0, positions).to(torch.float32)
        changes.append((positions, torch.sub(values, picked, out=torch.empty_like(picked))))
        base32.append(picked)
    if (name, start, stop) not in inputs.checked:  # the checks read_chunk makes, on the same values
        # the base is checked whole, so a non-finite delta is a non-finite agent value
        total = sum((deltas.sum() for _, deltas in changes), torch.zeros(()))
        if not torch.isfinite(total) or not finite_bits(base):
            _report_non_finite(inputs, name, start, stop)
        _check_stored_changes(inputs, name, start, stop, changes)
        inputs.checked.add((name, start, stop))
    return dataclasses.replace(chunk, changes=changes, base32=base32)


def stored_changes(
    inputs: MergeInputs, name: str, start: int, stop: int, epsilon: float
) -> tuple[list[torch.Tensor], int] | None:
    """Per agent, where rows ``[start, stop)`` have ``|delta| > epsilon``, from snapshots alone,
    without reading a value or the base: the stored indices (flat in the tensor, int32 or
    int64) and the shift that makes them positions in the chunk. A snapshot stores exactly the
    elements beyond its own epsilon, so when that is at least ``epsilon`` its stored indices
    are the change mask. None when some agent cannot promise that (a checkpoint, a dense or
    wider snapshot tensor, a smaller snapshot epsilon). The values are checked later, when the
    merge reads them, and a snapshot whose positions break the promise is refused there,
    before anything is published."""
    if not all(getattr(s, "epsilon", -1.0) >= epsilon for s in inputs.agents.values()):
        return None
    stored = _stored_rows(inputs, name, start, stop, values=False, absolute=True)
    if stored is None:
        return None
    return [indices for indices, _ in stored], start * _row_numel(inputs, name)


def _check_stored_changes(
    inputs: MergeInputs,
    name: str,
    start: int,
    stop: int,
    changes: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Refuse a snapshot whose stored elements do not all exceed its epsilon: counts taken
    from its positions alone (:func:`stored_changes`) would not be the merge's."""
    for source, (_, deltas) in zip(inputs.agents.values(), changes, strict=True):
        epsilon = getattr(source, "epsilon", None)
        if epsilon is not None and deltas.numel() and not bool(deltas.abs().min() > epsilon):
            raise InputError(
                f"snapshot {source.path}: tensor {name!r} (rows {start}-{stop}) stores elements "
                f"that changed by no more than its epsilon {epsilon:g}; the snapshot is damaged "
                "or was not written by ram-trl: take it again with ram-trl snapshot"
            )


_SCRATCH = threading.local()


def _scratch(numel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A zeroed bool mask, an int32 map and ``arange`` of ``numel`` elements, reused chunk after
    chunk by each thread: fresh memory costs a page fault per page, more than the work done in
    it."""
    have = getattr(_SCRATCH, "buffers", None)
    if have is None or have[0].numel() < numel:
        size = max(numel, CHUNK_ELEMENTS)
        have = (torch.zeros(size, dtype=torch.bool), torch.empty(size, dtype=torch.int32))
        _SCRATCH.buffers = have = (*have, torch.arange(size, dtype=torch.int32))
    marked = have[0][:numel]
    marked.zero_()
    return marked, have[1][:numel], have[2]


def _bits(values: torch.Tensor) -> torch.Tensor:
    """The stored bits of a float tensor as integers of the same width (exact comparisons)."""
    return values.view(_BIT_VIEWS[values.dtype.itemsize])


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Where two CPU float tensors of one dtype differ bit for bit. numpy's integer ``!=`` is
    ~7x faster than torch's on int16 (0.6 against 4.4 ms for 4M elements, one thread), and it is
    the same exact comparison."""
    return np.not_equal(_bits(a).numpy(), _bits(b).numpy())


_UNSIGNED = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def finite_bits(values: torch.Tensor) -> bool:
    """No NaN or Inf, from the exponent bits alone: on the CPU the largest magnitude's bits,
    in numpy (~2.5x a float32 sum of bf16, the fastest torch test; Inf and NaN are the
    magnitudes at or above all exponent bits set)."""
    if values.numel() == 0:
        return True
    mantissa = _MANTISSA_BITS.get(values.dtype)
    if mantissa is None or values.device.type != "cpu":
        return bool(torch.isfinite(values).all())
    width = values.dtype.itemsize
    sign = 1 << (8 * width - 1)
    exponent = (sign - 1) ^ ((1 << mantissa) - 1)  # all exponent bits set: Inf or NaN
    bits = _bits(values.reshape(-1)).numpy().view(_UNSIGNED[width])
    return int(np.bitwise_and(bits, sign - 1).max()) < exponent


def _report_non_finite(inputs: MergeInputs, name: str, start: int, stop: int) -> None:
    sources = {"the base": inputs.base, **{f"agent {a!r}": s for a, s in inputs.agents.items()}}
    for who, source in sources.items():
        values = read_rows(source, name, start, stop)
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            file = getattr(source.tensors[name], "file", source.path)
            raise InputError(f"{who} has {bad} NaN/Inf value(s) in tensor {name!r} (file {file})")
    chunk = read_chunk_unchecked(inputs, name, start, stop)
    raise InputError(
        f"tensor {name!r}: values too large to merge in float32 (rows {start}-{stop}; largest "
        f"deltas from {largest_agents(inputs, chunk)}): their sum overflows"
    )


def read_chunk_unchecked(inputs: MergeInputs, name: str, start: int, stop: int) -> torch.Tensor:
    """The agents' float64 deltas ``(N, n)`` of rows ``[start, stop)``, for error messages only
    (float64: the float32 ones overflowed)."""
    base = read_rows(inputs.base, name, start, stop).reshape(-1).to(torch.float64)
    agents = [read_rows(s, name, start, stop).reshape(-1) for s in inputs.agents.values()]
    return torch.stack([a.to(torch.float64) - base for a in agents])


def largest_agents(inputs: MergeInputs, deltas: torch.Tensor, limit: int = 2) -> str:
    """The agents (name and path) with the largest |delta| among ``deltas`` ``(N, m)``."""
    if deltas.numel() == 0:
        return "no agent"
    peak = deltas.abs().nan_to_num(nan=math.inf).amax(dim=1)
    order = sorted(range(len(peak)), key=lambda i: -float(peak[i]))[:limit]
    names = list(inputs.agents)
    return ", ".join(
        f"agent {names[i]!r} ({inputs.agents[names[i]].path}, |delta| {float(peak[i]):.3g})"
        for i in order
    )


def iter_chunks(
    inputs: MergeInputs,
    name: str,
    device: torch.device | str = "cpu",
    *,
    sparse: bool = True,
    stored: bool = False,
) -> Iterator[Chunk | StoredChunk]:
    """Every row chunk of a tensor, in order (see :func:`read_chunk` and :func:`spans`)."""
    for start, stop in spans(inputs, name, stored=stored):
        yield read_chunk(inputs, name, start, stop, device, sparse=sparse, stored=stored)


class TensorView:
    """One floating-point tensor of a merge, for a method's ``prepare_tensor`` hook: its chunks
    and sweeps of its magnitudes (see ``ram_trl.methods.base.TensorStream``).

    A tensor that fits in one chunk is read once, whatever a method does with it; a larger one is
    read again for each sweep and for the merge.
    """

    def __init__(
        self, inputs: MergeInputs, name: str, device: torch.device, *, stored: bool = False
    ) -> None:
        self.inputs, self.name, self.device = inputs, name, device
        #: the merge's chunks may come as :class:`StoredChunk` (its method has a ``rule_at``)
        self.stored = stored
        self.numel = inputs.base.tensors[name].numel
        self.agents = inputs.agent_names
        self._spans = spans(inputs, name, stored=stored)
        self._whole: dict[bool, Chunk] = {}

    def _only_chunk(self, sparse: bool, stored: bool = False) -> Chunk | StoredChunk:
        if (sparse, stored) not in self._whole:
            start, stop = self._spans[0]
            self._whole[sparse, stored] = read_chunk(
                self.inputs, self.name, start, stop, self.device, sparse=sparse, stored=stored
            )
        return self._whole[sparse, stored]

    def chunks(self, *, sparse: bool = True) -> Iterable[Chunk | StoredChunk]:
        stored = self.stored and sparse
        if len(self._spans) == 1:
            return [self._only_chunk(sparse, stored)]
        return iter_chunks(self.inputs, self.name, self.device, sparse=sparse, stored=stored)

    def magnitudes(self) -> Callable[[], Iterable[tuple[torch.Tensor, int]]]:
        if len(self._spans) == 1:
            chunk = self._only_chunk(True)
            return lambda: [_magnitudes(chunk)]  # type: ignore[arg-type]
        return lambda: map(_magnitudes, iter_chunks(self.inputs, self.name, self.device))


def _magnitudes(chunk: Chunk) -> tuple[torch.Tensor, int]:
    """|deltas| at the chunk's candidates, and how many implicit zeros each row has besides."""
    return chunk.deltas.abs(), chunk.numel - chunk.deltas.shape[1]


def default_threads() -> int:
    """Threads a merge uses: ``RAM_TRL_THREADS`` if set, else every usable core, at most 4
    (one reads, one merges, one writes; more only helps the counting pass)."""
    value = os.environ.get("RAM_TRL_THREADS")
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise InputError(f"RAM_TRL_THREADS={value!r} must be a positive integer") from None
        if threads < 1:
            raise InputError(f"RAM_TRL_THREADS={value!r} must be a positive integer")
        return threads
    return max(1, min(4, len(os.sched_getaffinity(0))))


class ReadAhead:
    """Reads the chunk a merge will most likely ask for next on a background thread, while the
    current one is merged and written: the next row chunk of the same tensor, or the first of
    the next floating-point tensor in ``names`` (in the chunks of :func:`spans`, ``stored`` as
    the merge's).

    A guess that turns out wrong (TIES' second sweep over a tensor, a dense read) costs one
    chunk read for nothing; the chunk asked for is then read on the caller's thread. At most two
    chunks are in flight besides the caller's, so memory stays bounded. The chunks are exactly
    those :func:`read_chunk` reads without it (same function, another thread); errors are raised
    to the caller when it asks for that chunk. Open it with ``with``; it sets
    ``inputs.read_ahead`` while open.
    """

    def __init__(self, inputs: MergeInputs, names: Sequence[str], *, stored: bool = False) -> None:
        self.inputs = inputs
        order = []
        for name in names:
            if inputs.base.tensors[name].dtype.is_floating_point:
                order += [(name, start, stop) for start, stop in spans(inputs, name, stored=stored)]
        self._next = {span: after for span, after in zip(order, order[1:], strict=False)}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ram-trl-read")
        self._pending: tuple[tuple, Future] | None = None
        self._lock = threading.Lock()

    def read(
        self,
        name: str,
        start: int,
        stop: int,
        device: torch.device | str,
        sparse: bool,
        stored: bool = False,
    ) -> Chunk | StoredChunk:
        key = (name, start, stop, str(device), sparse, stored)
        with self._lock:
            pending, self._pending = self._pending, None
            future = pending[1] if pending is not None and pending[0] == key else None
            after = self._next.get((name, start, stop))
            if future is None:  # a wrong guess: read it here, guess again from it
                future = Future()
                future.set_result(None)
            if after is not None:
                guess = (*after, str(device), sparse, stored)
                work = self._pool.submit(self._read, *after, device, sparse, stored)
                self._pending = (guess, work)
        chunk = future.result()
        if chunk is None:
            return self._read(name, start, stop, device, sparse, stored)
        return chunk

    def _read(
        self, name: str, start: int, stop: int, device: Any, sparse: bool, stored: bool
    ) -> Chunk | StoredChunk:
        return _read_chunk(self.inputs, name, start, stop, device, sparse, stored)

    def __enter__(self) -> ReadAhead:
        self.inputs.read_ahead = self
        return self

    def __exit__(self, *exc: object) -> None:
        self.inputs.read_ahead = None
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()
        self._pool.shutdown(wait=True)
