"""The one safetensors reader: lazy, streaming access to Hugging Face checkpoint folders.

Headers are parsed directly (8-byte little-endian length, then JSON), so listing a 70B model reads
a few kilobytes. Rows are read through a private memory map of each file: a read is a zero-copy
view, and the pages behind it are handed back to the kernel as soon as the tensor (and every view
of it) is garbage collected. That keeps the resident memory of a streaming merge at a few chunks
whatever the model size, where ``safetensors.safe_open`` (same speed, also zero-copy) keeps every
page it has touched mapped until the handle closes, so its RSS grows to the size of the model.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ram_trl.errors import InputError
from ram_trl.io.encoding import SAFETENSORS_DTYPES

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers, and so do we
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)  # absent on Windows


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: all a shard header needs, and the base of what every
    weight source says about its tensors."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def rows(self) -> int:
        """Length of dim 0, the dimension reads are chunked along; 1 for a 0-dim tensor."""
        return self.shape[0] if self.shape else 1


@dataclass(frozen=True)
class TensorInfo(TensorSpec):
    """Where one tensor lives: its file and the byte offset of its (row-major) data there."""

    file: Path
    offset: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header alone, validated against its size."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise InputError(f"{file}: malformed safetensors header (claims {length} bytes)")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + length
    tensors = {}
    for name, entry in header.items():
        info = _tensor_info(file, name, entry, data_start)
        if info.offset + info.nbytes > size:
            raise InputError(
                f"{file}: truncated file: tensor {name!r} ends at byte "
                f"{info.offset + info.nbytes} but the file has {size} bytes"
            )
        tensors[name] = info
    return tensors


def _tensor_info(file: Path, name: str, entry: Any, data_start: int) -> TensorInfo:
    try:
        code, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        ok = isinstance(code, str) and isinstance(shape, list)
        ok = ok and all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise InputError(f"{file}: malformed safetensors header entry for tensor {name!r}: {entry}")
    if code not in SAFETENSORS_DTYPES:
        raise InputError(
            f"{file}: tensor {name!r} has dtype {code!r}, which ram-trl does not support "
            f"(supported: {', '.join(SAFETENSORS_DTYPES)})"
        )
    info = TensorInfo(name, tuple(shape), SAFETENSORS_DTYPES[code], file, data_start + begin)
    if end - begin != info.nbytes:
        raise InputError(
            f"{file}: malformed safetensors header: tensor {name!r} of shape {info.shape} and "
            f"dtype {code} needs {info.nbytes} bytes but data_offsets span {end - begin}"
        )
    return info


def load_config(path: str | os.PathLike) -> dict | None:
    """The parsed ``config.json`` of a model folder, or None when it has none."""
    file = Path(path) / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{file}: expected a JSON object")
    return config


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> file name) of a sharded checkpoint's index."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise InputError(f"{index}: not a valid safetensors index (needs a weight_map object)")
    return weight_map


def _weight_files(path: Path, weight_map: dict[str, str] | None) -> list[Path]:
    """The safetensors files that make up the model: those the index names if there is one."""
    if weight_map is not None:
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise InputError(f"{path / INDEX_NAME} names {missing[0]!r}, which is missing")
        return [path / f for f in files]
    if (path / SINGLE_NAME).is_file():
        return [path / SINGLE_NAME]  # ignore stray siblings such as adapter_model.safetensors
    files = sorted(p for p in path.glob("*.safetensors") if not p.name.startswith("."))
    if not files:
        hint = ""
        if any(path.glob("pytorch_model*.bin")):
            hint = " It holds pytorch_model*.bin weights: convert to safetensors first"
            hint += " (e.g. from_pretrained, then save_pretrained)."
        raise InputError(f"{path}: no *.safetensors weight files found.{hint}")
    return files


class ModelFolder:
    """A Hugging Face model folder, read lazily one tensor (or one row range) at a time.

    ``tensors`` lists every tensor in on-disk order (file name, then offset), which is the order
    that reads pages sequentially. Tensors returned by :meth:`read` are zero-copy views of a
    private (copy-on-write) map of the file, valid even after :meth:`close`. Treat them as
    read-only: an in-place write never reaches the file, but other reads of the same rows see it,
    and it may be undone when they are freed. ``x.to(torch.float32)`` of a float32 read is the
    read itself, so clone before computing in place.
    """

    def __init__(self, path: str | os.PathLike, *, files: Sequence[str] | None = None) -> None:
        """``files``: read only these safetensors files of the folder (an adapter's
        ``adapter_model.safetensors``, say) instead of the model's weights."""
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such model folder")
        if not self.path.is_dir():
            raise InputError(f"{self.path}: not a folder (pass the folder that holds the weights)")
        self.config: dict | None = load_config(self.path)
        index = self.path / INDEX_NAME
        weight_map = _read_index(index) if index.is_file() and files is None else None
        paths = (
            _weight_files(self.path, weight_map)
            if files is None
            else [self.path / f for f in files]
        )
        found: dict[str, TensorInfo] = {}
        for file in paths:
            for name, info in read_header(file).items():
                if name in found:
                    raise InputError(
                        f"{self.path}: tensor {name!r} is stored twice, in {found[name].file.name}"
                        f" and {file.name}"
                    )
                found[name] = info
        for name, file in (weight_map or {}).items():
            if name not in found or found[name].file.name != file:
                where = (
                    f"it is in {found[name].file.name}" if name in found else "that file lacks it"
                )
                raise InputError(f"{index} maps tensor {name!r} to {file}, but {where}")
        order = sorted(found.values(), key=lambda i: (i.file.name, i.offset))
        self.tensors: dict[str, TensorInfo] = {i.name: i for i in order}
        self._maps: dict[Path, mmap.mmap] = {}

    def layout(self) -> dict[str, list[TensorSpec]]:
        """File name -> the tensors it holds, in on-disk order (what
        ``ShardedWriter.mirroring`` takes to write a checkpoint laid out like this one)."""
        files: dict[str, list[TensorSpec]] = {}
        for info in self.tensors.values():
            files.setdefault(info.file.name, []).append(info)
        return files

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start:stop)`` of tensor ``name`` along dim 0, in the stored dtype.

        A 0-dim tensor is returned whole (``start``/``stop`` ignored). The result is a zero-copy
        view of the file's memory map; see the class docstring.
        """
        info = self.tensors.get(name)
        if info is None:
            raise InputError(f"{self.path}: no tensor named {name!r} in this model")
        if not info.shape:
            start, stop = 0, 1
        stop = info.rows if stop is None else stop
        if not 0 <= start <= stop <= info.rows:
            raise ValueError(f"{info.file}: rows [{start}:{stop}) out of range for {name!r}")
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        count = math.prod(shape)
        if count == 0:
            return torch.empty(shape, dtype=info.dtype)
        row_bytes = info.nbytes // info.rows
        begin = info.offset + start * row_bytes
        mm = self._map(info.file)
        flat = torch.frombuffer(mm, dtype=info.dtype, count=count, offset=begin)
        # Release the pages wholly inside this read once its storage dies (every view included);
        # the kernel re-reads them from the file if something maps them again.
        end = begin + count * info.dtype.itemsize
        lo, hi = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE
        if _MADV_DONTNEED is not None and hi > lo:
            storage = flat.untyped_storage()
            weakref.finalize(storage, mm.madvise, _MADV_DONTNEED, lo, hi - lo).atexit = False
        return flat.view(shape)

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:  # the map keeps its own handle on the file
                mm = self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return mm

    def close(self) -> None:
        """Forget the memory maps. Each is unmapped once no tensor read from it is alive (closing
        it earlier would leave those tensors pointing at unmapped memory)."""
        self._maps.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, {len(self.tensors)} tensors)"
