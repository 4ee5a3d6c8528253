"""The one safetensors writer: tensors streamed into ``save_pretrained``-style shards.

Nothing is ever gathered per shard. When every tensor is declared up front (a merge output,
theta_0, test agents: :class:`ShardedWriter`), each shard's header is written first and the
tensor bytes follow as they come, row chunk by row chunk. When sizes are known only as the
tensors arrive (task-vector snapshots, whose sparse entries are sized while they are extracted:
:meth:`ShardedWriter.appending`), each shard keeps room for its header, an upper bound computed
from the names that may come, and fills it in when it is closed. Either way memory stays at one
chunk however large the model.

Files are written where they are asked to be; publishing a folder atomically is
:func:`ram_trl.io.atomic.atomic_directory`'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ram_trl.errors import InputError
from ram_trl.io.checkpoint import INDEX_NAME, TensorSpec
from ram_trl.io.encoding import SAFETENSORS_DTYPES, raw_bytes, safetensors_code

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SUPPORTED = frozenset(SAFETENSORS_DTYPES.values())

#: Files besides the weights that make an output folder loadable with ``from_pretrained``.
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)

#: how many bytes to buffer before asking the disk to start writing them back
_WRITEBACK_BYTES = 64 << 20


def parse_size(size: str | int) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"20KB"`` or ``1000``.

    Hugging Face convention: GB = 10**9 bytes, GiB = 2**30. Units are case-insensitive.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?\s*", str(size), re.IGNORECASE)
        if match is None:
            raise InputError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB, 2GiB or 1000")
        value = int(float(match[1]) * _UNITS[(match[2] or "").lower()])
    if value <= 0:
        raise InputError(f"size {size!r} must be positive")
    return value


def _opens_new_shard(used: int, nbytes: int, max_shard_bytes: int) -> bool:
    """The shard rule, like ``save_pretrained``'s: a tensor (or a group of tensors that must stay
    together) starts a new shard when it would push a non-empty one past the limit, so a tensor
    larger than the limit gets a shard of its own."""
    return used > 0 and used + nbytes > max_shard_bytes


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (see the shard rule)."""
    shards: list[list[TensorSpec]] = []
    used = 0
    for spec in specs:
        if not shards or (shards[-1] and _opens_new_shard(used, spec.nbytes, max_shard_bytes)):
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_names(count: int, basename: str = "model") -> list[str]:
    """``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` for several shards."""
    if count == 1:
        return [f"{basename}.safetensors"]
    return [f"{basename}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header_json(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": safetensors_code(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    return json.dumps(entries, separators=(",", ":")).encode()


def header_bound(keys: Iterable[tuple[str, int]]) -> int:
    """Room enough for the header of a file holding any subset of ``keys`` (name, number of
    dimensions) with ``{"format": "pt"}`` metadata, a multiple of 8 bytes."""
    big = 10**20  # more digits than any shape or offset
    total = len(json.dumps({"__metadata__": {"format": "pt"}}))
    for key, ndim in keys:
        entry = {"dtype": "F8_E4M3", "shape": [big] * ndim, "data_offsets": [big, big]}
        total += len(json.dumps({key: entry}, separators=(",", ":")))
    return (total + 7) // 8 * 8


@dataclass
class _Shard:
    """One output file: what it holds (in order), the room kept for its header, its handle."""

    path: Path
    room: int
    specs: list[TensorSpec] = field(default_factory=list)
    file: BinaryIO | None = None
    used: int = 0  # data bytes written
    headed: bool = False  # its header is written (declared tensors: before the data)
    data_hash: Any = None  # sha256 of the data bytes, fed as they are written (when asked for)
    header_hash: str | None = None  # sha256 of the 8-byte length and the header


class ShardedWriter:
    """Streams tensors into safetensors shards (``model.safetensors``, or
    ``model-0000k-of-0000n.safetensors`` plus ``model.safetensors.index.json``).

    Declared up front (the constructor: ``specs`` in write order), tensors are written with
    :meth:`write`, consecutive row chunks of each tensor in ``specs`` order; zero-byte tensors may
    be skipped. Otherwise (:meth:`appending`) whole groups of tensors come with
    :meth:`write_group` and the shards are cut as they come. Then :meth:`close`. Mistakes in that
    protocol are programming errors and raise ``ValueError``. Used as a context manager,
    ``close`` runs on success; on an exception the files are only closed, and the half-written
    folder is left to :func:`~ram_trl.io.atomic.atomic_directory` to remove.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = parse_size("5GB"),
        metadata: Mapping[str, str] | None = None,
        basename: str = "model",
    ) -> None:
        plan = plan_shards(list(specs), max_shard_bytes) or [[]]
        names = shard_names(len(plan), basename)
        self._setup(directory, metadata, basename, index=True)
        self._declare(dict(zip(names, plan, strict=True)))

    @classmethod
    def mirroring(
        cls, directory: str | os.PathLike, layout: Mapping[str, Sequence[TensorSpec]]
    ) -> ShardedWriter:
        """A writer of the files ``layout`` names (file name -> its tensors, in order), e.g. those
        of an existing checkpoint (``ModelFolder.layout()``): same files, same tensors in each."""
        writer = cls.__new__(cls)
        writer._setup(directory, None, "model", index=True)
        writer._declare({name: list(specs) for name, specs in layout.items()} or {})
        return writer

    @classmethod
    def appending(
        cls,
        directory: str | os.PathLike,
        keys: Iterable[tuple[str, int]],
        *,
        max_shard_bytes: int,
        basename: str,
        index: bool = False,
        checksums: bool = False,
    ) -> ShardedWriter:
        """A writer of tensors whose sizes are known only as they come, among ``keys`` (name,
        number of dimensions). Each shard keeps :func:`header_bound` bytes for its header; shards
        are written under temporary names and get their final ones at :meth:`close`. With
        ``checksums``, every byte is hashed as it is written (see :meth:`checksums`), so that a
        snapshot's manifest can record what a reader must find without reading the files back."""
        writer = cls.__new__(cls)
        writer._setup(directory, None, basename, index=index)
        writer._hashing = checksums
        writer._room = header_bound(keys)
        writer._max_shard_bytes = max_shard_bytes
        return writer

    def _setup(
        self,
        directory: str | os.PathLike,
        metadata: Mapping[str, str] | None,
        basename: str,
        *,
        index: bool,
    ) -> None:
        self.directory = Path(directory)
        meta = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("ShardedWriter: metadata keys and values must be strings")
        self._metadata = meta
        self._basename = basename
        self._index = index
        self._shards: list[_Shard] = []
        self._queue: list[tuple[int, TensorSpec]] | None = None  # declared tensors, in order
        self._next = 0  # index in _queue of the tensor being written
        self._done = 0  # bytes of it written so far
        self._open = -1  # the shard whose file is open (earlier ones are finished)
        self._closed = False
        self._unflushed = 0  # bytes written since the disk last got some to write back
        self._hashing = False
        self.files: list[Path] = []

    def _declare(self, layout: Mapping[str, list[TensorSpec]]) -> None:
        specs = [spec for shard in layout.values() for spec in shard]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError("ShardedWriter: duplicate tensor names in specs")
        unsupported = [s for s in specs if s.dtype not in _SUPPORTED]
        if unsupported:
            raise ValueError(f"ShardedWriter: unsupported dtype {unsupported[0].dtype}")
        for name, shard_specs in layout.items():
            room = len(_header_json(shard_specs, self._metadata))
            self._shards.append(_Shard(self.directory / name, room + (-room % 8), shard_specs))
        self.files = [shard.path for shard in self._shards]
        self._queue = [(k, spec) for k, shard in enumerate(self._shards) for spec in shard.specs]

    # -- declared tensors, row chunk by row chunk ------------------------------------------

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (along dim 0) of tensor ``name``; a 0-dim tensor comes whole."""
        if self._queue is None:
            raise ValueError("ShardedWriter: an appending writer takes write_group()")
        self._skip_finished(name)
        if self._next == len(self._queue) or self._queue[self._next][1].name != name:
            expected = self._queue[self._next][1].name if self._next < len(self._queue) else None
            raise ValueError(f"ShardedWriter: got rows of {name!r}, expected {expected!r}")
        shard, spec = self._queue[self._next]
        if rows.dtype != spec.dtype:
            raise ValueError(f"ShardedWriter: {name!r} has dtype {rows.dtype}, not {spec.dtype}")
        if spec.shape:
            fits = rows.dim() == len(spec.shape) and tuple(rows.shape[1:]) == spec.shape[1:]
        else:
            fits = rows.dim() == 0
        data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        if not fits or self._done + data.numel() > spec.nbytes:
            raise ValueError(
                f"ShardedWriter: rows of shape {tuple(rows.shape)} do not fit {name!r} of shape "
                f"{spec.shape} ({self._done} of {spec.nbytes} bytes already written)"
            )
        self._open_through(shard)
        self._append(data.numpy())
        self._done += data.numel()

    def _skip_finished(self, name: str | None = None) -> None:
        """Move past complete tensors, stopping at a zero-byte one named ``name``. Zero-byte
        tensors need no write, so a caller may skip them."""
        assert self._queue is not None
        while self._next < len(self._queue):
            spec = self._queue[self._next][1]
            if self._done < spec.nbytes or (spec.nbytes == 0 and spec.name == name):
                return
            self._next, self._done = self._next + 1, 0

    def _open_through(self, shard: int) -> None:
        """Finish the open shard and start every later one up to ``shard``."""
        while self._open < shard:
            self._finish_open()
            self._open += 1
            current = self._shards[self._open]
            current.file = open(current.path, "wb")  # noqa: SIM115 - spans write()s
            current.file.write(self._header(current))  # known up front: the file stays sequential
            current.headed = True

    # -- tensors sized as they come ----------------------------------------------------------

    def write_group(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Append whole tensors that must land in one shard (an appending writer); returns that
        shard's number (``files[number]`` once closed)."""
        if self._queue is not None:
            raise ValueError("ShardedWriter: a writer of declared tensors takes write()")
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        current = self._shards[-1] if self._shards else None
        if current is None or _opens_new_shard(current.used, size, self._max_shard_bytes):
            self._finish_open()
            part = self.directory / f"{self._basename}-part-{len(self._shards) + 1:05d}.tmp"
            current = _Shard(
                part, self._room, data_hash=hashlib.sha256() if self._hashing else None
            )
            self._shards.append(current)
            self._open = len(self._shards) - 1
            current.file = open(part, "wb")  # noqa: SIM115 - spans write_group()s
            current.file.seek(8 + current.room)
        for key, tensor in tensors.items():
            data = raw_bytes(tensor)
            self._append(data)
            current.specs.append(TensorSpec(key, tuple(tensor.shape), tensor.dtype))
        return len(self._shards) - 1

    # -- both ---------------------------------------------------------------------------------

    def _append(self, data: Any) -> None:
        shard = self._shards[self._open]
        assert shard.file is not None
        shard.file.write(data)
        if shard.data_hash is not None:
            shard.data_hash.update(data)
        shard.used += data.nbytes
        self._unflushed += data.nbytes
        if self._unflushed >= _WRITEBACK_BYTES:
            self._start_writeback(shard.file)

    def _start_writeback(self, file: BinaryIO) -> None:
        """Hand written pages to the disk now, without waiting: the final fsync then finds little
        left to do, and disk writes overlap merging instead of following it."""
        file.flush()
        if hasattr(os, "posix_fadvise"):  # starts writeback of dirty pages (Linux)
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._unflushed = 0

    def _finish_open(self) -> None:
        """Fill in the open shard's header, flush it to disk and close it."""
        if not 0 <= self._open < len(self._shards):
            return
        shard = self._shards[self._open]
        if shard.file is None:
            return
        if not shard.headed:
            header = self._header(shard)
            shard.file.seek(0)
            shard.file.write(header)
            if shard.data_hash is not None:
                shard.header_hash = hashlib.sha256(header).hexdigest()
        shard.file.flush()
        os.fsync(shard.file.fileno())
        shard.file.close()
        shard.file = None

    def _header(self, shard: _Shard) -> bytes:
        """The 8-byte length and the JSON header, padded with spaces to fill the shard's room."""
        header = _header_json(shard.specs, self._metadata)
        if len(header) > shard.room:  # pragma: no cover - the room is exact or a bound
            raise AssertionError("safetensors header exceeds the room kept for it")
        return shard.room.to_bytes(8, "little") + header.ljust(shard.room, b" ")

    def close(self) -> list[Path]:
        """Check that every byte was written, flush everything to disk, name the shards and write
        the index (when there are several). Returns the files written: shards, then the index."""
        if self._closed:
            return self._written()
        if self._queue is not None:
            self._skip_finished()
            if self._next < len(self._queue):
                spec = self._queue[self._next][1]
                raise ValueError(
                    f"ShardedWriter: tensor {spec.name!r} is incomplete ({self._done} of "
                    f"{spec.nbytes} bytes written)"
                )
            self._open_through(len(self._shards) - 1)  # shards holding only empty tensors
            self._finish_open()
        else:
            self._finish_open()
            names = shard_names(len(self._shards), self._basename)
            for shard, name in zip(self._shards, names, strict=True):
                os.replace(shard.path, self.directory / name)
                shard.path = self.directory / name
            self.files = [shard.path for shard in self._shards]
        if self._index and len(self.files) > 1:
            self._write_index()
        self._closed = True
        return self._written()

    def checksums(self) -> dict[str, dict[str, Any]]:
        """Per file written (by name), once closed: ``size``, ``header_sha256`` (of the first
        ``8 + header length`` bytes) and ``data_sha256`` (of the rest), hashed while streaming.
        Two digests, because the header is written last, at the front of the file."""
        if not self._closed or not self._hashing:
            raise ValueError("ShardedWriter: checksums need checksums=True and a closed writer")
        return {
            s.path.name: {
                "size": 8 + s.room + s.used,
                "header_sha256": s.header_hash,
                "data_sha256": s.data_hash.hexdigest(),
            }
            for s in self._shards
        }

    def _write_index(self) -> None:
        write_index(self.directory, {s.path.name: s.specs for s in self._shards}, self._basename)

    @property
    def _index_name(self) -> str:
        return INDEX_NAME.replace("model", self._basename, 1)

    def _written(self) -> list[Path]:
        index = self._index and len(self.files) > 1
        return self.files + ([self.directory / self._index_name] if index else [])

    def abort(self) -> None:
        """Close the open file, if any, without finishing it."""
        for shard in self._shards:
            if shard.file is not None:
                # the buffered rest may fail too (a full disk): the first error is the one
                with contextlib.suppress(OSError):
                    shard.file.close()
                shard.file = None

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_index(
    directory: Path, layout: Mapping[str, Sequence[TensorSpec]], basename: str = "model"
) -> Path:
    """``model.safetensors.index.json`` of the files ``layout`` names (file -> its tensors),
    flushed to disk; returns its path."""
    weight_map = {spec.name: file for file, specs in layout.items() for spec in specs}
    total = sum(spec.nbytes for specs in layout.values() for spec in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path = Path(directory) / INDEX_NAME.replace("model", basename, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (those of ``MODEL_FILES`` present) from
    ``src`` to ``dst``, following symlinks (Hub cache snapshots are symlinks). Returns the names."""
    copied = []
    for name in MODEL_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
