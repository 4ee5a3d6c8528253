"""Task vectors: what an RL-trained agent changed relative to its base, stored sparsely.

RL task vectors are sparse (the paper's agents changed 3.2% to 54% of their weights), so a
snapshot keeps, per tensor, only the elements with ``|tau| > epsilon`` (``tau`` computed in
float32 from the stored dtypes, strict ``>``: exactly the engine's change mask), as sorted flat
indices plus the fine-tuned values, or the whole tensor when that is smaller. Applying it to the
base gives the fine-tuned model back bit for bit, except for the sub-epsilon changes, which RAM
treats as "unchanged" anyway. See :mod:`ram_trl.snapshot.format` for the files.

Extraction reads one tensor at a time in row chunks, so memory is bounded by the largest
tensor's delta (plus a chunk in float32), never the model; :func:`snapshot_folders` writes each
tensor as soon as it is extracted. :class:`~ram_trl.snapshot.source.TaskVectorSource` lets the
merge engine read a snapshot as if it were the agent's checkpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ram_trl.errors import InputError
from ram_trl.io import (
    ModelFolder,
    ShardedWriter,
    atomic_directory,
    fsync_path,
    parse_size,
    read_rows,
    row_chunks,
    safetensors_code,
    torch_dtype,
)
from ram_trl.methods.base import CHANGE_EPSILON, compared_base
from ram_trl.snapshot.fingerprint import fingerprint_folder, fingerprint_state_dict, unique_tensors
from ram_trl.snapshot.format import (
    BASENAME,
    Layout,
    Manifest,
    TensorEntry,
    check_sorted,
    index_dtype_for,
    indices_key,
    snapshot_files,
    validate,
    values_key,
)

#: a snapshot keeps what RAM's default change mask sees (a larger one would lose changes)
DEFAULT_EPSILON = CHANGE_EPSILON
DEFAULT_MAX_SHARD_SIZE = "5GB"
CHUNK_ELEMENTS = 1 << 23  # float32 working set per chunk: 32 MiB per operand


@dataclass
class TensorDelta:
    """One tensor of a task vector. ``sparse``: ``indices`` (flat, strictly increasing) and
    ``values`` (fine-tuned weights there); ``dense``: ``values`` is the whole fine-tuned tensor
    with sub-epsilon elements reset to base; ``unchanged``: nothing."""

    layout: Layout
    shape: tuple[int, ...]
    dtype: torch.dtype
    nnz: int
    indices: torch.Tensor | None = None
    values: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def apply_to(self, base: torch.Tensor) -> torch.Tensor:
        """The fine-tuned tensor: ``base`` (cast to the fine-tuned dtype) with the changes in."""
        if self.layout == "dense":
            assert self.values is not None
            return self.values.reshape(self.shape).clone()
        out = base.detach().to(device="cpu", dtype=self.dtype, copy=True).reshape(self.shape)
        if self.layout == "sparse":
            assert self.indices is not None and self.values is not None
            out.view(-1)[self.indices.to(torch.int64)] = self.values
        return out


class _DictReader:
    """Row reads from an in-memory state dict, with the interface of ``ModelFolder``."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], label: str):
        self.path = Path(label)
        self._sd = state_dict
        self.tensors = {n: _Info(tuple(t.shape), t.dtype, label) for n, t in state_dict.items()}

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        t = self._sd[name].detach()
        return (t if t.dim() == 0 else t[start:stop]).to("cpu")


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WIDENS_EXACTLY = (torch.bfloat16, torch.float16, torch.float32)  # to float32 inside sub_
_FEW = 8  # widen only the differing elements when at most 1/_FEW of a chunk differs


def _flatnonzero(mask: torch.Tensor) -> torch.Tensor:
    # numpy's flatnonzero is several times faster than torch.nonzero on CPU
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def _abs_diff(base: torch.Tensor, tuned: torch.Tensor) -> torch.Tensor | None:
    """``|float32(tuned) - float32(base)|`` in a new buffer; None if it holds NaN/Inf."""
    diff = tuned.to(torch.float32, copy=True)  # never subtract in place from the caller's tensor
    diff.sub_(base if base.dtype in _WIDENS_EXACTLY else base.to(torch.float32))
    diff.abs_()
    if diff.numel() and not math.isfinite(float(diff.amax())):
        return None
    return diff


def changed_positions(
    base: torch.Tensor, tuned: torch.Tensor, epsilon: float
) -> torch.Tensor | None:
    """Flat positions (int64, sorted) where ``|float32(tuned) - float32(base)| > epsilon``: the
    engine's change mask. None if a changed element is NaN/Inf (the engine refuses those).

    With equal dtypes only elements whose bits differ can have changed; when those are few (an
    RL task vector), they are found with an integer comparison and only they are widened.
    """
    base, tuned = compared_base(base.reshape(-1), tuned.dtype), tuned.reshape(-1)
    if base.dtype == tuned.dtype:
        as_int = _SAME_SIZE_INT[base.dtype.itemsize]
        bits_differ = tuned.view(as_int).numpy() != base.view(as_int).numpy()
        if np.count_nonzero(bits_differ) * _FEW <= bits_differ.size:
            candidates = torch.from_numpy(np.flatnonzero(bits_differ))
            diff = _abs_diff(base[candidates], tuned[candidates])
            return None if diff is None else candidates[diff > epsilon]
    diff = _abs_diff(base, tuned)
    return None if diff is None else _flatnonzero(diff > epsilon)


def _broken(name: str, base: Any, tuned: Any) -> InputError:
    return InputError(
        f"tensor {name!r} holds NaN/Inf values in the fine-tuned model ({tuned.path}) or the "
        f"base ({base.path}): a broken checkpoint cannot be snapshotted"
    )


def extract_tensor(
    base: Any,
    tuned: Any,
    name: str,
    epsilon: float,
    chunk_elements: int = CHUNK_ELEMENTS,
    *,
    sparse_only: bool = False,
) -> TensorDelta:
    """Extract one tensor's delta, reading both sources in row chunks.

    Sparse pieces are collected while they cost less than the dense rows seen so far; once
    they do not, the tensor is built densely (the earlier rows re-read from the base), so the
    memory held is never more than the dense tensor. If the tensor turns out sparse enough in
    the end after all, it is extracted again, sparse only: the layout is always the smaller.
    """
    shape = tuple(base.tensors[name].shape)
    dtype = torch_dtype(tuned.tensors[name].dtype)
    numel, row_numel = math.prod(shape), math.prod(shape[1:]) if shape else 1
    index = torch.int32 if index_dtype_for(numel) == "I32" else torch.int64
    entry_bytes = index.itemsize + dtype.itemsize
    positions: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    dense: torch.Tensor | None = None
    nnz = 0
    for start, stop in row_chunks(shape, chunk_elements):
        b = read_rows(base, name, start, stop).reshape(-1)
        t = read_rows(tuned, name, start, stop).reshape(-1)
        offset, seen = start * row_numel, (start * row_numel + b.numel())
        if dense is not None:
            diff = _abs_diff(compared_base(b, t.dtype), t)
            if diff is None:
                raise _broken(name, base, tuned)
            mask = diff > epsilon
            nnz += int(np.count_nonzero(mask.numpy()))
            torch.where(mask, t, b.to(dtype), out=dense[offset:seen])
            continue
        pos = changed_positions(b, t, epsilon)
        if pos is None:
            raise _broken(name, base, tuned)
        nnz += pos.numel()
        positions.append((pos + offset).to(index))
        values.append(t[pos])
        if sparse_only or nnz * entry_bytes < seen * dtype.itemsize:
            continue
        dense = torch.empty(numel, dtype=dtype)
        for a, z in row_chunks((start, *shape[1:]), chunk_elements) if start else ():
            dense[a * row_numel : z * row_numel] = read_rows(base, name, a, z).reshape(-1)
        dense[offset:seen] = b
        dense[torch.cat(positions).to(torch.int64)] = torch.cat(values)
        positions, values = [], []
    if nnz == 0:
        return TensorDelta("unchanged", shape, dtype, 0)
    if dense is None:
        return TensorDelta("sparse", shape, dtype, nnz, torch.cat(positions), torch.cat(values))
    if nnz * entry_bytes < numel * dtype.itemsize:
        del dense
        return extract_tensor(base, tuned, name, epsilon, chunk_elements, sparse_only=True)
    return TensorDelta("dense", shape, dtype, nnz, values=dense.reshape(shape))


def _check_pair(base: Any, tuned: Any) -> None:
    where = f"the fine-tuned model ({tuned.path})"
    missing = [n for n in base.tensors if n not in tuned.tensors]
    extra = [n for n in tuned.tensors if n not in base.tensors]
    if missing or extra:
        what = f"lacks {missing[:5]}" if missing else f"has tensors the base lacks: {extra[:5]}"
        raise InputError(f"{where} {what} (base: {base.path}); a task vector needs the same names")
    for name, info in base.tensors.items():
        if tuple(tuned.tensors[name].shape) != tuple(info.shape):
            raise InputError(
                f"tensor {name!r} has shape {tuple(tuned.tensors[name].shape)} in {where} but "
                f"{tuple(info.shape)} in the base ({base.path})"
            )


def _iter_deltas(base: Any, tuned: Any, epsilon: float) -> Iterator[tuple[str, TensorDelta]]:
    _check_pair(base, tuned)
    for name in base.tensors:
        yield name, extract_tensor(base, tuned, name, epsilon)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_epsilon(epsilon: float) -> float:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon >= 0):
        raise InputError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    return float(epsilon)


def _write(
    directory: str | os.PathLike,
    base: Any,
    deltas: Iterator[tuple[str, TensorDelta]],
    meta: Manifest,
    max_shard_size: int | str,
) -> Manifest:
    """Write deltas as they come. A new ``directory`` is published atomically (written as a
    hidden sibling, then renamed); an existing one must be empty and is written in place, with
    the manifest last, so that a folder without one is an interrupted write."""
    directory = Path(directory)
    if not directory.exists():
        with atomic_directory(directory) as tmp:
            return _write(tmp, base, deltas, meta, max_shard_size)
    if not directory.is_dir() or any(directory.iterdir()):
        raise InputError(f"cannot write a snapshot into {directory}: it is not an empty folder")
    keys = []
    for name, info in base.tensors.items():
        keys += [(indices_key(name), 1), (values_key(name), 1), (name, len(info.shape))]
    writer = ShardedWriter.appending(
        directory,
        keys,
        max_shard_bytes=parse_size(max_shard_size),
        basename=BASENAME,
        checksums=True,
    )
    entries: dict[str, TensorEntry] = {}
    shards: dict[str, int] = {}  # tensor -> the shard holding its data, named once all are written
    with writer:
        for name, d in deltas:
            entry = TensorEntry(name, d.shape, safetensors_code(d.dtype), d.layout, d.nnz)
            if d.layout == "sparse":
                assert d.indices is not None and d.values is not None
                group = {indices_key(name): d.indices, values_key(name): d.values}
                shards[name] = writer.write_group(group)
                entry = replace(entry, index_dtype=safetensors_code(d.indices.dtype))
            elif d.layout == "dense":
                assert d.values is not None
                shards[name] = writer.write_group({name: d.values.reshape(d.shape)})
            entries[name] = entry
            del d  # before the next tensor is extracted: one tensor's delta in memory at a time
    files = [path.name for path in writer.files]
    entries = {
        n: replace(e, file=files[shards[n]]) if n in shards else e for n, e in entries.items()
    }
    manifest = replace(meta, tensors=entries, files=files, checksums=writer.checksums())
    manifest.write(directory)
    fsync_path(directory)
    return manifest


def snapshot_folders(
    base: Any,
    finetuned: Any,
    directory: str | os.PathLike,
    *,
    epsilon: float = DEFAULT_EPSILON,
    agent: str | None = None,
    step: int | None = None,
    metrics: Mapping[str, float] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Manifest:
    """Extract the task vector of a fine-tuned checkpoint folder and write it to ``directory``
    in one streaming pass: each tensor is written as soon as it is extracted. ``base`` and
    ``finetuned`` are paths or open ``ModelFolder`` objects. Returns the written manifest."""
    epsilon = _check_epsilon(epsilon)
    with _opened(base, ModelFolder) as b, _opened(finetuned, ModelFolder) as t:
        fp, where = fingerprint_folder(b), str(Path(b.path).resolve())
        meta = Manifest(epsilon, fp, {}, agent, step, _now(), dict(metrics or {}), base_path=where)
        return _write(directory, b, _iter_deltas(b, t, epsilon), meta, max_shard_size)


class _opened:
    """Open a path as a ModelFolder for the duration of a ``with``; pass objects through."""

    def __init__(self, source: Any, cls: type):
        self.owned = isinstance(source, (str, os.PathLike))
        self.source = cls(source) if self.owned else source

    def __enter__(self) -> Any:
        return self.source

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.source.close()


class TaskVector:
    """A task vector in memory: one :class:`TensorDelta` per base tensor, plus metadata."""

    def __init__(
        self,
        deltas: Mapping[str, TensorDelta],
        *,
        epsilon: float,
        base_fingerprint: str,
        agent: str | None = None,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        created: str | None = None,
        base_path: str | None = None,
    ):
        self.deltas = dict(deltas)
        self.epsilon = epsilon
        self.base_fingerprint = base_fingerprint
        self.agent, self.step = agent, step
        self.metrics = dict(metrics or {})
        self.created = created or _now()
        self.base_path = base_path  # where the base was, when known (for messages)

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def _extract(cls, base: Any, tuned: Any, fingerprint: str, **meta: Any) -> TaskVector:
        epsilon = _check_epsilon(meta.pop("epsilon"))
        deltas = dict(_iter_deltas(base, tuned, epsilon))
        return cls(deltas, epsilon=epsilon, base_fingerprint=fingerprint, **meta)

    @classmethod
    def from_state_dicts(
        cls,
        base: Mapping[str, torch.Tensor],
        finetuned: Mapping[str, torch.Tensor],
        *,
        epsilon: float = DEFAULT_EPSILON,
        agent: str | None = None,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
        base_fingerprint: str | None = None,
    ) -> TaskVector:
        """From two state dicts (tensors on any device; tied aliases are dropped).
        ``base_fingerprint`` skips hashing the base when the caller already knows it."""
        base, finetuned = unique_tensors(base), unique_tensors(finetuned)
        fp = base_fingerprint or fingerprint_state_dict(base)
        b, t = _DictReader(base, "<base state dict>"), _DictReader(finetuned, "<state dict>")
        return cls._extract(b, t, fp, epsilon=epsilon, agent=agent, step=step, metrics=metrics)

    @classmethod
    def from_module(
        cls, module: torch.nn.Module, theta0: Mapping[str, torch.Tensor], **options: Any
    ) -> TaskVector:
        """From a live module against ``theta0``, a copy of its state dict taken before training
        (names as in ``module.state_dict()``); ``options`` as :meth:`from_state_dicts`. Ties are
        read from the live module, so a cloned ``theta0`` may still hold the alias; it is ignored
        like in the saved folder."""
        live = unique_tensors(module.state_dict())
        missing = [n for n in live if n not in theta0]
        if missing:
            raise InputError(f"theta0 lacks {len(missing)} tensor(s) of the module: {missing[:5]}")
        return cls.from_state_dicts({n: theta0[n] for n in live}, live, **options)

    @classmethod
    def from_folders(
        cls,
        base: Any,
        finetuned: Any,
        *,
        epsilon: float = DEFAULT_EPSILON,
        agent: str | None = None,
        step: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> TaskVector:
        """From two checkpoint folders (paths or ``ModelFolder``), one tensor at a time. To write
        to disk without holding the snapshot, use :func:`snapshot_folders` instead."""
        with _opened(base, ModelFolder) as b, _opened(finetuned, ModelFolder) as t:
            fp, where = fingerprint_folder(b), str(Path(b.path).resolve())
            meta = dict(agent=agent, step=step, metrics=metrics, base_path=where)
            return cls._extract(b, t, fp, epsilon=epsilon, **meta)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TaskVector:
        """Read a whole snapshot into memory, checking it fully (indices sorted and in range)."""
        directory = Path(directory)
        manifest = validate(directory)
        deltas = {}
        files = snapshot_files(directory, manifest)
        for name, e in manifest.tensors.items():
            if e.layout == "unchanged":
                deltas[name] = TensorDelta("unchanged", e.shape, e.torch_dtype, 0)
            elif e.layout == "dense":
                values = files.read(name).clone()
                deltas[name] = TensorDelta("dense", e.shape, e.torch_dtype, e.nnz, values=values)
            else:
                idx = files.read(indices_key(name)).clone()
                check_sorted(idx, e, directory)
                val = files.read(values_key(name)).clone()
                deltas[name] = TensorDelta("sparse", e.shape, e.torch_dtype, e.nnz, idx, val)
        if files is not None:
            files.close()
        return cls(
            deltas,
            epsilon=manifest.epsilon,
            base_fingerprint=manifest.base_fingerprint,
            agent=manifest.agent,
            step=manifest.step,
            metrics=manifest.metrics,
            created=manifest.created,
            base_path=manifest.base_path,
        )

    # -- inspection --------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The metadata (without file names, which exist only once saved)."""
        entries = {
            n: TensorEntry(n, d.shape, safetensors_code(d.dtype), d.layout, d.nnz)
            for n, d in self.deltas.items()
        }
        return Manifest(
            self.epsilon,
            self.base_fingerprint,
            entries,
            self.agent,
            self.step,
            self.created,
            self.metrics,
            base_path=self.base_path,
        )

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self.deltas.values())

    @property
    def numel(self) -> int:
        return sum(d.numel for d in self.deltas.values())

    @property
    def density(self) -> float:
        return self.nnz / self.numel if self.numel else 0.0

    def changed_counts(self) -> dict[str, int]:
        return {n: d.nnz for n, d in self.deltas.items()}

    def __repr__(self) -> str:
        return (
            f"TaskVector(agent={self.agent!r}, step={self.step}, tensors={len(self.deltas)}, "
            f"density={self.density:.4%}, base={self.base_fingerprint[:19]})"
        )

    # -- use ---------------------------------------------------------------------------------

    def save(
        self, directory: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    ) -> Manifest:
        """Write to ``directory``: a new folder appears atomically; an existing one must be
        empty and is filled in place, ``manifest.json`` last."""
        shapes = _DictReader({}, "")
        shapes.tensors = {n: _Info(d.shape, d.dtype, "") for n, d in self.deltas.items()}
        return _write(directory, shapes, iter(self.deltas.items()), self.manifest, max_shard_size)

    def apply(self, base: Any, *, check_fingerprint: bool = True) -> dict[str, torch.Tensor]:
        """Rebuild the fine-tuned state dict from the base (a state dict, a folder path or a
        ``ModelFolder``): exact, up to the dropped sub-epsilon changes. The base must be the one
        the task vector was taken against (checked by fingerprint unless told not to)."""
        if isinstance(base, Mapping):
            reader: Any = _DictReader(unique_tensors(base), "<base state dict>")
            fp = fingerprint_state_dict(base) if check_fingerprint else None
            return self._apply(reader, fp)
        with _opened(base, ModelFolder) as folder:
            return self._apply(folder, fingerprint_folder(folder) if check_fingerprint else None)

    def _apply(self, base: Any, fp: str | None) -> dict[str, torch.Tensor]:
        if fp is not None and fp != self.base_fingerprint:
            raise InputError(
                f"the base {base.path} has fingerprint {fp}, but the task vector of agent "
                f"{self.agent!r} was taken against {self.base_fingerprint}"
            )
        if set(base.tensors) != set(self.deltas):
            diff = sorted(set(base.tensors) ^ set(self.deltas))[:5]
            raise InputError(f"the base {base.path} and the task vector differ in tensors {diff}")
        for name, d in self.deltas.items():
            if tuple(base.tensors[name].shape) != d.shape:
                raise InputError(
                    f"tensor {name!r} has shape {tuple(base.tensors[name].shape)} in the base "
                    f"{base.path} but {d.shape} in the task vector"
                )
        return {n: d.apply_to(base.read(n)) for n, d in self.deltas.items()}
