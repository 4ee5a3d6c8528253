"""The spill of a one-pass merge: what the counting pass already merged, kept until the counts
are known.

Methods whose whole-model statistics only scale the unique deltas (the RAM family's
``unscaled_rule``) can merge every chunk while they count it. Per chunk the spill keeps the
candidate positions (int32), the merged delta there with every scale 1 (float32) and the owner
of each unique element (the method's codes): about 9 bytes per changed element, where
reading the chunk again costs 2 bytes per element from every agent and the base, plus finding
the changes. The merge pass then reads the base and the spill instead of every checkpoint again.

The bytes live in an unnamed temporary file next to the output (``O_TMPFILE`` where the system
has it), so the page cache holds them, not the process, and the system frees them when the
file is closed, even if the process dies. A tensor is spilled whole or not at all: past the
byte budget, or when the disk is full, its chunks are left out and the merge pass reads that
tensor from the inputs as a two-pass merge does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

#: the share of the free disk space (after the output's own size) a spill may take
DISK_SHARE = 0.5
_Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Spill:
    """Chunks of merged deltas, written in order and read back by (tensor, first row)."""

    def __init__(self, directory: str | os.PathLike, budget: int) -> None:
        # closed by close(), or by the system with the process
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".ram-trl-spill-")  # noqa: SIM115
        self._budget = budget
        self._size = 0
        self._where: dict[tuple[str, int], tuple[int, int, torch.dtype]] = {}
        self._kept: set[str] = set()  # tensors with a chunk here
        self._partial: set[str] = set()  # tensors with a chunk left out

    @classmethod
    def beside(cls, out: str | os.PathLike, output_bytes: int) -> Spill:
        """A spill on the filesystem of ``out`` (its nearest existing folder), allowed
        :data:`DISK_SHARE` of the space the output leaves free."""
        folder = Path(out).absolute()
        while not folder.is_dir():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        return cls(folder, int(max(free - output_bytes, 0) * DISK_SHARE))

    def put(self, name: str, start: int, entry: _Entry) -> None:
        """Keep rows from ``start`` of tensor ``name``: ``(positions, merged, owners)``."""
        if name in self._partial:
            return
        positions, merged, owners = entry
        parts = [positions.to(torch.int32), merged.to(torch.float32), owners]
        views = [memoryview(p.contiguous().numpy()).cast("B") for p in parts]
        size = sum(v.nbytes for v in views)
        if self._size + size > self._budget:
            self._partial.add(name)
            return
        try:
            written = os.pwritev(self._file.fileno(), views, self._size)
        except OSError:  # a full disk: this tensor, and the rest, are read again instead
            written = -1
        if written != size:
            self._partial.add(name)
            self._budget = self._size
            return
        self._where[(name, start)] = (self._size, positions.numel(), owners.dtype)
        self._kept.add(name)
        self._size += size

    def holds(self, name: str) -> bool:
        """Whether every chunk of tensor ``name`` is here (the merge pass replays it)."""
        return name in self._kept and name not in self._partial

    def take(self, name: str, start: int) -> _Entry:
        """The chunk kept for rows from ``start`` of ``name``: positions (int64), merged
        deltas (float32) and owners."""
        offset, count, dtype = self._where.pop((name, start))
        positions = torch.empty(count, dtype=torch.int32)
        merged = torch.empty(count, dtype=torch.float32)
        owners = torch.empty(count, dtype=dtype)
        views = [memoryview(t.numpy()).cast("B") for t in (positions, merged, owners)]
        size = sum(v.nbytes for v in views)
        if size and os.preadv(self._file.fileno(), views, offset) != size:
            raise OSError(f"the merge's spill file ended early at byte {offset}")
        return positions.to(torch.int64), merged, owners

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spilled_entry(index: torch.Tensor | None, merged: torch.Tensor, owners: torch.Tensor) -> _Entry:
    """What :meth:`Spill.put` keeps of a chunk merged at ``index`` (its candidates): all of
    them, since a candidate whose merged delta is zero is written as the base either way and
    filtering costs more than it saves. A dense chunk (``index`` None) keeps only the positions
    whose merged delta is not zero."""
    if index is not None:
        return index, merged, owners
    keep = torch.from_numpy(np.flatnonzero(merged.numpy()))
    return keep, merged.index_select(0, keep), owners.index_select(0, keep)
