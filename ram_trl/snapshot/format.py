"""The on-disk format of a task-vector snapshot: ``manifest.json`` plus safetensors files.

A snapshot folder holds ``manifest.json`` and ``task_vector.safetensors`` (or, when large,
``task_vector-00001-of-0000N.safetensors``). Per base tensor the manifest records its layout:

* ``unchanged``: no element moved by more than epsilon; nothing is stored.
* ``sparse``: ``<name>::indices`` (flat, strictly increasing, int32 or int64) and
  ``<name>::values`` (the *fine-tuned* weights at those indices, in the fine-tuned dtype).
  Values rather than deltas, because the difference of two bf16 numbers is not always a bf16
  number: with values, reconstruction is exact.
* ``dense``: ``<name>``, the whole fine-tuned tensor with sub-epsilon elements reset to base.

Files are written one tensor at a time by an appending ``ram_trl.io.ShardedWriter`` (header room
bounded from the tensor names, filled in at the end), so no shard is ever held in memory. They
are ordinary safetensors files: ``safe_open`` or ``ram_trl.io.ModelFolder`` read them like any
checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ram_trl.errors import InputError
from ram_trl.io.atomic import write_synced
from ram_trl.io.checkpoint import ModelFolder, TensorInfo, read_header
from ram_trl.io.encoding import SAFETENSORS_DTYPES, safetensors_code

FORMAT = "ram-trl.task-vector"
FORMAT_VERSION = 2  # 2: per-file checksums; version 1 snapshots (none) are still read
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
LAYOUTS = ("unchanged", "sparse", "dense")
Layout = Literal["unchanged", "sparse", "dense"]
BASENAME = "task_vector"  # task_vector.safetensors, task_vector-00001-of-0000N.safetensors


def index_dtype_for(numel: int) -> str:
    """int32 indices whenever they fit: they are 4 of the 6 bytes a sparse bf16 element costs."""
    return "I32" if numel <= 2**31 - 1 else "I64"


def indices_key(name: str) -> str:
    return f"{name}::indices"


def values_key(name: str) -> str:
    return f"{name}::values"


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One base tensor as the snapshot stores it."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code of the fine-tuned tensor (and of the stored values)
    layout: Layout
    nnz: int  # elements with |tau| > epsilon
    file: str | None = None  # the safetensors file holding its data (None when unchanged)
    index_dtype: str | None = None  # "I32" or "I64" for sparse entries

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    def keys(self) -> list[str]:
        if self.layout == "sparse":
            return [indices_key(self.name), values_key(self.name)]
        return [self.name] if self.layout == "dense" else []

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "dtype": self.dtype}
        out.update(layout=self.layout, nnz=self.nnz)
        if self.file is not None:
            out["file"] = self.file
        if self.index_dtype is not None:
            out["index_dtype"] = self.index_dtype
        return out


@dataclass
class Manifest:
    """What ``manifest.json`` says about a snapshot. ``tensors`` are in the base's order."""

    epsilon: float
    base_fingerprint: str
    tensors: dict[str, TensorEntry]
    agent: str | None = None
    step: int | None = None
    created: str | None = None  # ISO 8601, UTC
    metrics: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    base_path: str | None = None  # where the base was when the snapshot was taken (a hint)
    #: per file: size, header_sha256, data_sha256, hashed as the writer streamed them
    checksums: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.tensors.values())

    @property
    def nnz(self) -> int:
        return sum(e.nnz for e in self.tensors.values())

    @property
    def density(self) -> float:
        """Fraction of the model's elements that changed by more than epsilon."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def dtypes(self) -> list[str]:
        return sorted({e.dtype for e in self.tensors.values()})

    def changed_counts(self) -> dict[str, int]:
        """Changed elements per tensor (what RAM's overlap statistics are built from)."""
        return {name: e.nnz for name, e in self.tensors.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "agent": self.agent,
            "step": self.step,
            "epsilon": self.epsilon,
            "dtypes": self.dtypes,
            "base_fingerprint": self.base_fingerprint,
            "base_path": self.base_path,
            "created": self.created,
            "metrics": self.metrics,
            "numel": self.numel,
            "nnz": self.nnz,
            "files": self.files,
            "checksums": self.checksums,
            "tensors": {name: e.to_json() for name, e in self.tensors.items()},
        }

    def write(self, directory: Path) -> None:
        text = json.dumps(self.to_json(), indent=1) + "\n"
        write_synced(directory / MANIFEST, text.encode())

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Manifest:
        """Parse ``directory/manifest.json``; any problem is an InputError naming the file."""
        path = Path(directory) / MANIFEST
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(
                f"{directory} is not a task-vector snapshot: {path} is missing"
            ) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"snapshot manifest {path} is unreadable or not JSON: {e}") from None
        try:
            return cls._from_json(data)
        except InputError as e:
            raise InputError(f"snapshot manifest {path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InputError(f"snapshot manifest {path} is malformed: {e!r}") from None

    @classmethod
    def _from_json(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InputError(f"not a {FORMAT} manifest")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise InputError(
                f"format version {version!r} is not supported (this ram-trl reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade ram-trl or re-create the "
                "snapshot"
            )
        tensors = {}
        for name, t in data["tensors"].items():
            layout = t["layout"]
            if layout not in LAYOUTS:
                raise InputError(f"tensor {name!r} has unknown layout {layout!r}")
            entry = TensorEntry(
                name=name,
                shape=tuple(int(d) for d in t["shape"]),
                dtype=safetensors_code(t["dtype"]),
                layout=layout,
                nnz=int(t["nnz"]),
                file=t.get("file"),
                index_dtype=t.get("index_dtype"),
            )
            _check_entry(entry)
            tensors[name] = entry
        step = data.get("step")
        return cls(
            epsilon=float(data["epsilon"]),
            base_fingerprint=str(data["base_fingerprint"]),
            tensors=tensors,
            agent=data.get("agent"),
            step=None if step is None else int(step),
            created=data.get("created"),
            metrics={str(k): float(v) for k, v in (data.get("metrics") or {}).items()},
            files=[str(f) for f in data.get("files", [])],
            base_path=data.get("base_path"),
            checksums=_checksums(data.get("checksums") or {}),
            format_version=version,
        )


def _checksums(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, c in data.items():
        size, header, body = c["size"], c["header_sha256"], c["data_sha256"]
        if not (isinstance(size, int) and isinstance(header, str) and isinstance(body, str)):
            raise InputError(f"the checksum of {name} is malformed")
        out[str(name)] = {"size": size, "header_sha256": header, "data_sha256": body}
    return out


def _check_entry(e: TensorEntry) -> None:
    where = f"tensor {e.name!r}"
    if not 0 <= e.nnz <= e.numel:
        raise InputError(f"{where}: nnz {e.nnz} is outside [0, {e.numel}]")
    if e.layout == "unchanged" and e.nnz:
        raise InputError(f"{where} is 'unchanged' but has nnz {e.nnz}")
    if e.layout != "unchanged" and (e.file is None or "/" in e.file or e.file.startswith(".")):
        raise InputError(f"{where}: missing or invalid 'file' {e.file!r}")
    if e.layout == "sparse" and e.index_dtype not in ("I32", "I64"):
        raise InputError(f"{where}: sparse entries need index_dtype I32 or I64")


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------


def lock_entry(directory: Path, *, shared: bool, wait: bool = True) -> int | None:
    """flock ``directory/manifest.json`` and return the fd (close it to unlock).

    Readers hold a shared lock while they read a snapshot; a store removes or replaces an entry
    only under an exclusive one, so it never pulls files from under a reader. Returns None when
    ``wait`` is false and the lock is taken, -1 when the entry has no manifest (nothing to
    protect). The lock is on the file *at this path*: if the entry was moved away meanwhile,
    a reader gets an InputError and a writer retries on what is there now. Like every flock, it
    is shared with children forked (without exec) while it is held.
    """
    path = directory / MANIFEST
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if shared:
                raise InputError(
                    f"{directory} is not a task-vector snapshot: {path} is missing"
                ) from None
            return -1
        try:
            mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
            fcntl.flock(fd, mode if wait else mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            moved = os.stat(path).st_ino != os.fstat(fd).st_ino
        except FileNotFoundError:
            moved = True
        if not moved:
            return fd
        os.close(fd)
        if shared:
            raise InputError(f"snapshot {directory} was removed or replaced while being opened")


def _read_one(info: TensorInfo, position: int) -> int:
    """Element ``position`` of an integer tensor, read straight from its file."""
    size = info.dtype.itemsize
    with open(info.file, "rb") as f:
        f.seek(info.offset + position * size)
        raw = bytearray(f.read(size))
    return int(torch.frombuffer(raw, dtype=info.dtype)[0])


def validate(directory: str | os.PathLike) -> Manifest:
    """Check a snapshot from its manifest and file headers (cheap: no tensor data is read except
    the first and last index of each sparse tensor). Returns the manifest; raises InputError
    naming the snapshot and the problem: bad or unknown-version manifest, missing or truncated
    file, a tensor whose stored shape/dtype/nnz disagrees with the manifest, an index out of range.
    """
    directory = Path(directory)
    manifest = Manifest.read(directory)
    headers: dict[str, dict[str, TensorInfo]] = {}
    for name in manifest.files:
        if "/" in name or name.startswith("."):
            raise InputError(f"snapshot {directory}: invalid file name {name!r} in the manifest")
        if not (directory / name).is_file():
            raise InputError(f"snapshot {directory}: file {name} is missing")
        try:
            headers[name] = read_header(directory / name)
        except InputError as e:
            raise InputError(f"snapshot {directory} is truncated or corrupted: {e}") from None
        expected = manifest.checksums.get(name)
        if expected is not None and (directory / name).stat().st_size != expected["size"]:
            raise InputError(
                f"snapshot {directory}: file {name} has {(directory / name).stat().st_size} "
                f"bytes, but its checksum entry says {expected['size']} (truncated or rewritten)"
            )
    if manifest.format_version >= 2 and set(manifest.checksums) != set(manifest.files):
        raise InputError(f"snapshot {directory}: the manifest lacks checksums of some files")
    for e in manifest.tensors.values():
        if e.layout == "unchanged":
            continue
        where = f"snapshot {directory}, tensor {e.name!r} ({e.file})"
        if e.file not in headers:
            raise InputError(f"{where}: the file is not listed in the manifest")
        header = headers[e.file]
        if e.layout == "dense":
            _expect(header, e.name, e.dtype, e.shape, where)
            continue
        if e.nnz == 0:
            raise InputError(f"{where}: sparse with nnz 0")
        _expect(header, indices_key(e.name), e.index_dtype, (e.nnz,), where)
        _expect(header, values_key(e.name), e.dtype, (e.nnz,), where)
        info = header[indices_key(e.name)]
        first, last = _read_one(info, 0), _read_one(info, e.nnz - 1)
        if first < 0 or last >= e.numel or first > last:
            raise InputError(
                f"{where}: indices out of range (first {first}, last {last}, numel {e.numel})"
            )
    return manifest


def verify_checksums(directory: str | os.PathLike, manifest: Manifest) -> None:
    """Read every byte of the snapshot's files and compare them with the manifest's checksums;
    an InputError names the file on a mismatch. Values rewritten with the headers left intact
    pass :func:`validate`, which reads headers only; they fail here. A version-1 snapshot has no
    checksums and passes."""
    directory = Path(directory)
    for name, expected in manifest.checksums.items():
        path = directory / name
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            f.seek(0)
            header, data = _sha256(f, 8 + length), _sha256(f)
        for part, digest in (("header", header), ("data", data)):
            if digest != expected[f"{part}_sha256"]:
                raise InputError(
                    f"snapshot {directory}: file {name} fails its sha256 checksum ({part} "
                    f"{digest[:12]}..., manifest {expected[f'{part}_sha256'][:12]}...): its "
                    "content changed after it was written; re-create the snapshot"
                )


def _sha256(file: Any, limit: int | None = None) -> str:
    """Hex sha256 of the next ``limit`` bytes of ``file`` (all that is left when None)."""
    digest, left = hashlib.sha256(), limit
    while left is None or left > 0:
        block = file.read(1 << 20 if left is None else min(1 << 20, left))
        if not block:
            break
        digest.update(block)
        left = None if left is None else left - len(block)
    return digest.hexdigest()


def _expect(
    header: dict[str, TensorInfo], key: str, dtype: str | None, shape: tuple[int, ...], where: str
) -> None:
    info = header.get(key)
    if info is None:
        raise InputError(f"{where}: the file lacks {key!r}")
    stored = safetensors_code(info.dtype)
    if stored != dtype or info.shape != shape:
        raise InputError(
            f"{where}: {key!r} is {stored} {list(info.shape)} in the file but the "
            f"manifest says {dtype} {list(shape)} (nnz mismatch or corruption)"
        )


def snapshot_files(directory: Path, manifest: Manifest) -> Any:
    """The snapshot's safetensors files, read like a checkpoint (None when nothing changed)."""
    return ModelFolder(directory) if manifest.files else None


def check_sorted(idx: torch.Tensor, e: TensorEntry, where: Path, previous: int = -1) -> int:
    """Raise unless ``idx`` is strictly increasing, above ``previous`` and below numel."""
    if idx.numel() == 0:
        return previous
    bad = int(idx[0]) <= previous or int(idx[-1]) >= e.numel
    if idx.numel() > 1 and not bad:  # numpy compares integers several times faster than torch
        values = idx.numpy()
        bad = bool(np.less_equal(values[1:], values[:-1]).any())
    if bad:
        raise InputError(
            f"snapshot {where}, tensor {e.name!r}: indices are not strictly increasing "
            f"within [0, {e.numel}) (corrupted file {e.file})"
        )
    return int(idx[-1])
