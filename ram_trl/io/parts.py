"""One output's shard files written by several processes at once, each its own tensors.

A merge split across ranks (:mod:`ram_trl.merging.split`) must publish the very files a single
process writes. With every tensor declared up front, each file's bytes are known in advance
but for the tensor data: the header (what :class:`~ram_trl.io.writer.ShardedWriter` writes
first) fixes every tensor's offset. So one process lays the files out (:func:`lay_out`: header,
then the file extended to its final size, and the index), and then each process writes its own
tensors' rows at their offsets (:class:`RegionWriter`), in any order relative to the others.
Splitting by tensor rather than by file keeps the ranks busy whatever the shard size: a model
under ``--shard-size`` is a single file, and it is still split.

The processes must see one filesystem and may write disjoint byte ranges of one file (a local
disk; NFS, Lustre and GPFS too). Each process fsyncs what it wrote before it reports success.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from ram_trl.io.checkpoint import TensorSpec
from ram_trl.io.writer import _header_json, write_index

_METADATA = {"format": "pt"}  # what ShardedWriter writes without metadata


def _header(specs: Sequence[TensorSpec]) -> bytes:
    """The 8-byte length and the space-padded JSON header, as ShardedWriter writes them."""
    header = _header_json(specs, _METADATA)
    room = len(header) + (-len(header) % 8)
    return room.to_bytes(8, "little") + header.ljust(room, b" ")


def lay_out(directory: Path, layout: Mapping[str, Sequence[TensorSpec]]) -> list[Path]:
    """Create every file of ``layout`` (file name -> its tensors, in order) at its final size,
    headers written and data still zero, and the index when there are several files. Returns
    the files, as ``ShardedWriter.close`` does: shards, then the index."""
    files = []
    for name, specs in layout.items():
        header = _header(specs)
        path = directory / name
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in specs))
        files.append(path)
    if len(layout) > 1:
        files.append(write_index(directory, layout))
    return files


class RegionWriter:
    """Writes the tensors ``names`` of a laid-out ``layout`` (see :func:`lay_out`) in place.

    The same protocol as ``ShardedWriter.write``: consecutive row chunks of each tensor, the
    tensors in any order. :meth:`close` checks that each was written whole and fsyncs.
    """

    def __init__(
        self, directory: Path, layout: Mapping[str, Sequence[TensorSpec]], names: Collection[str]
    ) -> None:
        self._where: dict[str, tuple[Path, int, TensorSpec]] = {}
        for file, specs in layout.items():
            offset = len(_header(specs))
            for spec in specs:
                if spec.name in names:
                    self._where[spec.name] = (directory / file, offset, spec)
                offset += spec.nbytes
        missing = set(names) - set(self._where)
        if missing:
            raise ValueError(f"RegionWriter: tensors not in the layout: {sorted(missing)}")
        self._done = dict.fromkeys(self._where, 0)
        self._files: dict[Path, BinaryIO] = {}

    def write(self, name: str, rows: torch.Tensor) -> None:
        if name not in self._where:
            raise ValueError(f"RegionWriter: {name!r} is not one of this writer's tensors")
        path, offset, spec = self._where[name]
        if rows.dtype != spec.dtype:
            raise ValueError(f"RegionWriter: {name!r} has dtype {rows.dtype}, not {spec.dtype}")
        data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._done[name] + data.nbytes > spec.nbytes:
            raise ValueError(f"RegionWriter: rows of shape {tuple(rows.shape)} overflow {name!r}")
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = open(path, "r+b")  # noqa: SIM115 - spans write()s
        file.seek(offset + self._done[name])
        file.write(data)
        self._done[name] += data.nbytes

    def close(self) -> list[Path]:
        """Check every tensor is complete, flush to disk and close; the files written to."""
        for name, (_, _, spec) in self._where.items():
            if self._done[name] != spec.nbytes:
                raise ValueError(
                    f"RegionWriter: tensor {name!r} is incomplete ({self._done[name]} of "
                    f"{spec.nbytes} bytes written)"
                )
        for file in self._files.values():
            file.flush()
            os.fsync(file.fileno())
        written = list(self._files)
        self.abort()
        return written

    def abort(self) -> None:
        for file in self._files.values():
            with contextlib.suppress(OSError):
                file.close()
        self._files.clear()
