"""Base fingerprints: which theta_0 a task vector was taken against.

A task vector is meaningless against any other base, and snapshots are written by training jobs
(holding theta_0 in memory) and read by offline merges (holding a checkpoint folder), so both
must compute the same value: a sha256 over the tensor names, dtypes, shapes and raw contents, in
sorted name order, independent of sharding and on-disk order. Hashing reads the model once (about
1 GB/s), so the result for a folder is cached in ``.ram_trl_fingerprint.json`` next to its
weights, keyed by the weight files' names, sizes and modification times.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ram_trl.io import (
    ModelFolder,
    raw_bytes,
    read_rows,
    row_chunks,
    safetensors_code,
)

CACHE_FILE = ".ram_trl_fingerprint.json"
_VERSION = "ram-trl.fingerprint.v1"
_CHUNK_ELEMENTS = 1 << 24
_MEMO: dict[tuple[str, str], str] = {}  # (folder, cache key) -> fingerprint, for read-only folders


def unique_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases of tied weights, keeping the first name, as ``save_pretrained`` does.

    ``module.state_dict()`` lists a tied ``lm_head.weight`` next to ``model.embed_tokens.weight``
    (same storage); the saved folder holds only the latter, and so must the fingerprint and the
    snapshot of a live module, or they would never match the folder's.
    """
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for name, t in state_dict.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype)
        key += (tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def _digest(items: Iterator[tuple[str, torch.dtype | str, tuple[int, ...], Iterator[Any]]]) -> str:
    h = hashlib.sha256(_VERSION.encode() + b"\n")
    for name, dtype, shape, chunks in items:
        h.update(json.dumps([name, safetensors_code(dtype), list(shape)]).encode() + b"\n")
        for chunk in chunks:
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _tensor_chunks(t: torch.Tensor) -> Iterator[memoryview]:
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        yield raw_bytes(flat[start : start + _CHUNK_ELEMENTS])


def fingerprint_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """The fingerprint of an in-memory model (tied aliases dropped, see :func:`unique_tensors`);
    equal to :func:`fingerprint_folder` of the folder it would be saved to."""
    sd = unique_tensors(state_dict)
    return _digest(
        (name, sd[name].dtype, tuple(sd[name].shape), _tensor_chunks(sd[name]))
        for name in sorted(sd)
    )


def _folder_chunks(folder: Any, name: str) -> Iterator[memoryview]:
    for start, stop in row_chunks(tuple(folder.tensors[name].shape), _CHUNK_ELEMENTS):
        yield raw_bytes(read_rows(folder, name, start, stop))


def _cache_key(path: Path) -> str:
    files = []
    for p in sorted(path.iterdir()):
        if p.name.endswith((".safetensors", ".safetensors.index.json")) and p.is_file():
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    return json.dumps(files)


def fingerprint_folder(folder: Any, *, cache: bool = True) -> str:
    """The fingerprint of a checkpoint folder (a path or an open ``ModelFolder``), read tensor by
    tensor in bounded chunks. Cached in the folder (silently skipped when it is read-only)."""
    owned = isinstance(folder, (str, os.PathLike))
    source = ModelFolder(folder) if owned else folder
    try:
        path = Path(source.path)
        key = _cache_key(path) if cache else ""
        cached = _read_cache(path, key) if cache else None
        if cached is not None:
            return cached
        tensors = source.tensors
        result = _digest(
            (n, tensors[n].dtype, tuple(tensors[n].shape), _folder_chunks(source, n))
            for n in sorted(tensors)
        )
        if cache:
            _write_cache(path, key, result)
        return result
    finally:
        if owned:
            source.close()


def _read_cache(path: Path, key: str) -> str | None:
    memo = _MEMO.get((str(path.resolve()), key))
    if memo is not None:
        return memo
    try:
        data = json.loads((path / CACHE_FILE).read_text())
        if data.get("version") == _VERSION and data.get("key") == key:
            return str(data["fingerprint"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    return None


def _write_cache(path: Path, key: str, fingerprint: str) -> None:
    _MEMO[(str(path.resolve()), key)] = fingerprint
    tmp = path / f"{CACHE_FILE}.{os.getpid()}.tmp"
    try:  # a cache: no fsync, and a read-only folder only loses it (the memo still helps)
        tmp.write_text(json.dumps({"version": _VERSION, "key": key, "fingerprint": fingerprint}))
        os.replace(tmp, path / CACHE_FILE)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def fingerprint_of(model: Any) -> str:
    """Fingerprint a folder path, an open ``ModelFolder`` or a state dict."""
    if isinstance(model, Mapping):
        return fingerprint_state_dict(model)
    return fingerprint_folder(model)
