"""Streaming, atomic output of ``save_pretrained``-style safetensors checkpoints.

Every tensor's shape and dtype is known before the first byte is merged, so each shard's header
can be written up front and rows appended as they are computed: memory stays at one chunk however
large the model. The output folder appears (by rename) only once it is complete.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import torch

from ram_trl.errors import InputError, OutputExistsError
from ram_trl.io.checkpoint import DTYPES, INDEX_NAME, SINGLE_NAME, TensorSpec

_CODES = {dtype: code for code, dtype in DTYPES.items()}
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}

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


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (like
    ``save_pretrained``: a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """A safetensors header: 8-byte length, then JSON padded with spaces to a multiple of 8."""
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        entries[spec.name] = {
            "dtype": _CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


#: how many bytes to buffer before asking the disk to start writing them back
_WRITEBACK_BYTES = 64 << 20


class ShardedWriter:
    """Streams tensors, in an order fixed up front, into save_pretrained-style safetensors shards.

    Call :meth:`write` with consecutive row chunks of each tensor, tensors in ``specs`` order, then
    :meth:`close`. Mistakes in that protocol are programming errors and raise ``ValueError``.
    Used as a context manager, ``close`` runs on success; on an exception the files are only
    closed, and the half-written folder is left to :func:`atomic_directory` to remove.
    """

    def __init__(
        self,
        directory: Path,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = parse_size("5GB"),
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("ShardedWriter: duplicate tensor names in specs")
        unsupported = [s for s in self.specs if s.dtype not in _CODES]
        if unsupported:
            raise ValueError(f"ShardedWriter: unsupported dtype {unsupported[0]}")
        meta = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("ShardedWriter: metadata keys and values must be strings")
        self._metadata = meta
        self._shards = plan_shards(self.specs, max_shard_bytes) or [[]]
        self.files = [self.directory / n for n in _shard_names(len(self._shards))]
        self._queue = [(shard, spec) for shard, specs in enumerate(self._shards) for spec in specs]
        self._next = 0  # index in _queue of the tensor being written
        self._done = 0  # bytes of it written so far
        self._shard = -1  # last shard started (its file is open until the next one starts)
        self._file: BinaryIO | None = None
        self._closed = False
        self._unflushed = 0  # bytes written since the disk last got some to write back

    def write(self, name: str, rows: torch.Tensor) -> None:
        """Append the next rows (along dim 0) of tensor ``name``; a 0-dim tensor comes whole."""
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
        assert self._file is not None
        self._file.write(data.numpy())
        self._done += data.numel()
        self._unflushed += data.numel()
        if self._unflushed >= _WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Hand written pages to the disk now, without waiting: the final fsync then finds little
        left to do, and disk writes overlap merging instead of following it."""
        assert self._file is not None
        self._file.flush()
        if hasattr(os, "posix_fadvise"):  # starts writeback of dirty pages (Linux)
            os.posix_fadvise(self._file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._unflushed = 0

    def _skip_finished(self, name: str | None = None) -> None:
        """Move past complete tensors, stopping at a zero-byte one named ``name``. Zero-byte
        tensors need no write, so a caller may skip them."""
        while self._next < len(self._queue):
            spec = self._queue[self._next][1]
            if self._done < spec.nbytes or (spec.nbytes == 0 and spec.name == name):
                return
            self._next, self._done = self._next + 1, 0

    def _open_through(self, shard: int) -> None:
        """Finish the open shard file and start every later one up to ``shard``, header first."""
        while self._shard < shard:
            self._finish_file()
            self._shard += 1
            self._file = open(self.files[self._shard], "wb")  # noqa: SIM115 - spans write()s
            self._file.write(_header(self._shards[self._shard], self._metadata))

    def _finish_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[Path]:
        """Check that every byte was written, flush everything to disk and write the index (when
        there are several shards). Returns the files written: shards, then the index."""
        if self._closed:
            return self._written()
        self._skip_finished()
        if self._next < len(self._queue):
            spec = self._queue[self._next][1]
            raise ValueError(
                f"ShardedWriter: tensor {spec.name!r} is incomplete ({self._done} of "
                f"{spec.nbytes} bytes written)"
            )
        self._open_through(len(self._shards) - 1)  # shards holding only empty tensors
        self._finish_file()
        if len(self.files) > 1:
            weight_map = {spec.name: self.files[shard].name for shard, spec in self._queue}
            total = sum(spec.nbytes for spec in self.specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(self.directory / INDEX_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._closed = True
        return self._written()

    def _written(self) -> list[Path]:
        return self.files + ([self.directory / INDEX_NAME] if len(self.files) > 1 else [])

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (renames, new files), to disk. POSIX only:
    elsewhere folders cannot be opened, and the OS makes its own guarantees."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; publish it there by rename only if the block
    succeeds.

    At every instant ``final`` is absent, the complete old folder or the complete new one: a crash
    or an exception never leaves a half-written model where a user (or ``from_pretrained``) looks.
    The temporary folder is a hidden sibling, so the rename stays on one filesystem.
    """
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{final} exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for path in [*tmp.rglob("*"), tmp]:  # all of it is on disk before it is published
            if path.is_file() or path.is_dir():
                fsync_path(path)
        if not overwrite:
            _publish_new(tmp, final)
        elif final.exists() or final.is_symlink():
            old = final.parent / f".{final.name}.old-{tag}"
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)
                raise
            fsync_path(final.parent)
            _remove(old)
        else:
            os.replace(tmp, final)
            fsync_path(final.parent)
    except BaseException:
        _remove(tmp)
        raise


def _publish_new(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final`` unless something is there: ``rename(2)`` refuses a non-empty
    target, which settles a race between two writers; an empty one we must refuse ourselves."""
    message = f"{final} appeared while writing; pass --overwrite to replace it"
    if final.exists() or final.is_symlink():
        raise OutputExistsError(message)
    try:
        os.rename(tmp, final)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise OutputExistsError(message) from None
        raise
    fsync_path(final.parent)


def copy_model_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (those of ``MODEL_FILES`` present) from
    ``src`` to ``dst``, following symlinks (Hub cache snapshots are symlinks). Returns the names."""
    copied = []
    for name in MODEL_FILES:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
