"""A task-vector snapshot seen as the agent's checkpoint: the merge engine's weight source.

The engine reads every agent through the same small interface as ``ram_trl.io.ModelFolder``
(``path``, ``tensors``, ``config``, ``read(name, start, stop)``). :class:`TaskVectorSource`
implements it over a snapshot and its base, lazily: rows are the base rows with the stored
values scattered in, so an engine can merge snapshots without densifying a whole model.
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ram_trl import native
from ram_trl.errors import InputError
from ram_trl.io import ModelFolder, TensorSpec, read_rows
from ram_trl.snapshot.fingerprint import fingerprint_folder
from ram_trl.snapshot.format import (
    Layout,
    TensorEntry,
    check_sorted,
    indices_key,
    lock_entry,
    snapshot_files,
    validate,
    values_key,
    verify_checksums,
)

INDEX_CHUNK = 1 << 23  # sorted indices read at once when locating rows (32 MiB of int32)


@dataclass(frozen=True)
class SnapshotTensorInfo(TensorSpec):
    """What the engine needs to know about one tensor of a snapshot: the agent's shape/dtype."""

    file: str
    layout: Layout
    nnz: int


class TaskVectorSource:
    """A snapshot seen as the agent's checkpoint: the engine's weight-source interface.

    ``read(name, start, stop)`` returns the agent's rows: the base rows with the stored values
    scattered in. The snapshot's files are read lazily like any checkpoint (a ``ModelFolder``
    memory map, whose pages are released after each read); for a sparse tensor the row range is
    located with per-row offsets into the sorted indices, computed once per tensor from the
    indices in chunks (kept: 8 bytes per row), so a chunked read touches only its own entries.
    """

    def __init__(self, snapshot_dir: str | os.PathLike, base: Any, *, verify_base: bool = True):
        self.path = Path(snapshot_dir)
        # held until close() (or garbage collection): a store neither prunes nor replaces a
        # snapshot that is being read
        self._release = weakref.finalize(self, os.close, lock_entry(self.path, shared=True))
        try:
            self.manifest = validate(self.path)
            # every byte once (a sparse snapshot is a small fraction of a checkpoint): values
            # rewritten behind intact headers must not merge into different weights
            verify_checksums(self.path, self.manifest)
        except BaseException:
            self._release()
            raise
        self._owned = isinstance(base, (str, os.PathLike))
        self.base = ModelFolder(base) if self._owned else base
        try:
            self._check_base(verify_base)
            self._files = snapshot_files(self.path, self.manifest)
        except BaseException:
            self.close()
            raise
        self.config = self.base.config
        self.tensors = {
            n: SnapshotTensorInfo(
                n, e.shape, e.torch_dtype, str(self.path / (e.file or "")), e.layout, e.nnz
            )
            for n, e in self.manifest.tensors.items()
        }
        self._row_offsets: dict[str, torch.Tensor] = {}
        self._bases: dict[int, tuple[Any, bool]] = {}  # id -> (object, is this base)
        self._lock = threading.Lock()

    @property
    def agent(self) -> str | None:
        return self.manifest.agent

    def _check_base(self, verify: bool) -> None:
        where = f"snapshot {self.path}"
        if verify:
            fp = fingerprint_folder(self.base)
            if fp != self.manifest.base_fingerprint:
                raise InputError(
                    f"{where} was taken against base {self.manifest.base_fingerprint}, but the "
                    f"base {self.base.path} has fingerprint {fp}: merge it with its own base"
                )
        ours, theirs = self.manifest.tensors, self.base.tensors
        if set(ours) != set(theirs):
            diff = sorted(set(ours) ^ set(theirs))[:5]
            raise InputError(f"{where} and the base {self.base.path} differ in tensors {diff}")
        for name, e in ours.items():
            if tuple(theirs[name].shape) != e.shape:
                raise InputError(
                    f"{where}: tensor {name!r} has shape {e.shape} but {tuple(theirs[name].shape)} "
                    f"in the base {self.base.path}"
                )

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the agent's tensor ``name`` in its dtype (0-dim: whole)."""
        e = self.manifest.tensors.get(name)
        if e is None:
            raise InputError(f"snapshot {self.path} has no tensor named {name!r}")
        if e.layout == "dense":
            return self._files.read(name, start, stop)
        if not e.shape:
            start, stop = 0, 1
        stop = e.rows if stop is None else stop
        rows = read_rows(self.base, name, start, stop).to(e.torch_dtype, copy=True)
        if e.layout == "sparse" and stop > start:
            offsets = self._offsets(e)
            lo, hi = int(offsets[start]), int(offsets[stop])
            idx = self._files.read(indices_key(name), lo, hi).to(torch.int64)
            rows.view(-1)[idx - start * e.row_numel] = self._files.read(values_key(name), lo, hi)
        return rows

    @property
    def epsilon(self) -> float:
        """The snapshot's change threshold: it stores exactly the elements whose
        ``|float32(tuned) - float32(base)|`` exceeds it (``nnz`` in the manifest)."""
        return self.manifest.epsilon

    def changed_rows(
        self,
        name: str,
        start: int,
        stop: int,
        base: Any,
        *,
        values: bool = True,
        absolute: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Where rows ``[start, stop)`` of tensor ``name`` may differ from ``base``'s, and the
        agent's values there: flat positions within the rows (int64, increasing) and values in
        the agent's dtype (None with ``values=False``). Everywhere else the rows :meth:`read`
        returns are ``base``'s bit for bit, so a merge reads only these (a few percent of a
        checkpoint) instead of rebuilding the rows. The positions are the elements whose delta
        exceeds :attr:`epsilon`. None when that cannot be promised: another base than this
        snapshot's, a dense tensor, or one stored in another dtype than the base's (its rows
        are rounded copies). With ``absolute``, the positions are the stored indices as they
        are: flat in the whole tensor, int32 or int64 (a compiled kernel reads them there)."""
        e = self.manifest.tensors.get(name)
        if e is None or not self._is_base(base) or e.layout == "dense":
            return None
        if e.torch_dtype != self.base.tensors[name].dtype:
            return None
        if not e.shape:
            start, stop = 0, 1
        if e.layout == "unchanged" or stop <= start:
            empty = torch.empty(0, dtype=e.torch_dtype) if values else None
            return torch.empty(0, dtype=torch.int64), empty
        offsets = self._offsets(e)
        lo, hi = int(offsets[start]), int(offsets[stop])
        idx = self._files.read(indices_key(name), lo, hi)
        stored = self._files.read(values_key(name), lo, hi) if values else None
        if absolute:
            return idx, stored
        return idx.to(torch.int64) - start * e.row_numel, stored

    def _is_base(self, base: Any) -> bool:
        """``base`` is the folder this snapshot is applied to (the same object or path). The
        answer is kept per object: resolving paths costs more than a chunk's lookup."""
        if base is self.base:
            return True
        known = self._bases.get(id(base))  # the object is kept with it: its id stays its own
        if known is not None:
            return known[1]
        theirs, ours = getattr(base, "path", None), getattr(self.base, "path", None)
        same = (
            theirs is not None
            and ours is not None
            and Path(theirs).resolve() == Path(ours).resolve()
        )
        self._bases[id(base)] = (base, same)
        return same

    def _offsets(self, e: TensorEntry) -> torch.Tensor:
        """``offsets[r]``: position in the sorted indices of the first element of row ``r``
        (one pass of the compiled kernel over the indices, or a binary search of every row
        start in each chunk of indices, summed over chunks; either checks them)."""
        with self._lock:
            if e.name not in self._row_offsets and e.nnz:
                found = _compiled_offsets(self._files.read(indices_key(e.name)), e)
                if found is not None:
                    self._row_offsets[e.name] = found
            if e.name not in self._row_offsets:
                offsets = torch.zeros(e.rows + 1, dtype=torch.int64)
                previous = -1
                for a in range(0, e.nnz, INDEX_CHUNK):
                    stop = min(a + INDEX_CHUNK, e.nnz)
                    idx = self._files.read(indices_key(e.name), a, stop)
                    previous = check_sorted(idx, e, self.path, previous)
                    starts = torch.arange(e.rows + 1, dtype=torch.int64) * e.row_numel
                    offsets += torch.searchsorted(idx, starts.to(idx.dtype))
                self._row_offsets[e.name] = offsets
            return self._row_offsets[e.name]

    def close(self) -> None:
        if getattr(self, "_files", None) is not None:
            self._files.close()
        self._release()  # idempotent
        if self._owned:
            self.base.close()
            self._owned = False

    def __enter__(self) -> TaskVectorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TaskVectorSource({str(self.path)!r}, agent={self.agent!r})"


def _compiled_offsets(indices: torch.Tensor, e: TensorEntry) -> torch.Tensor | None:
    """:meth:`TaskVectorSource._offsets` by the compiled kernel, None without one (or when the
    indices are out of order: the torch path then names the file)."""
    lib = native.library()
    if lib is None or not native.indexable([indices]):
        return None
    return native.row_offsets(lib, indices.reshape(-1), e.row_numel, e.rows)
