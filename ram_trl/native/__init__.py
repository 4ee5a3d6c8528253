"""Compiled loops for what torch ops cannot fuse: RAM at snapshots' stored changes.

A merge from sparse snapshots walks each agent's stored indices. In torch every change goes
through six to eight indexed kernels (1-3 ns per element each); :file:`ram_at.c` does the walk
in two loops per cache-sized block, and gives the same bits (see its header). It is plain C (no
Python or torch headers), so it builds in a fraction of a second against any torch: on first
use, with the system C compiler (``$CC``, else ``cc``), into a cache
(``$RAM_TRL_CACHE/native``, default ``~/.cache/ram-trl/native``), and is loaded with ctypes,
the way torch's ``cpp_extension``, DeepSpeed's ops and Triton build theirs. The build is
published atomically (a temporary name, then a rename), so concurrent jobs share it.

Without a compiler, or with ``RAM_TRL_NATIVE=0``, :func:`library` is None and callers use the
torch path: the same results, slower (the ``ram_trl.native`` logger says why, at INFO). A
kernel reports trouble (a non-finite value, a damaged snapshot) as a status only; the caller
then runs the torch path, which explains it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ram_at.c")
#: IEEE float32 as torch computes it: no contraction into FMAs, no fast-math reassociation
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math")
#: elements per block in ram_at.c (its BLOCK): the scratch is BLOCK float32 sums and BLOCK counts
BLOCK = 65536
#: kernel dtype codes
DTYPES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
#: ram_at.c's statuses besides OK (0): the torch path must run and say what is wrong
NOT_FINITE, NOT_CHANGED, OUT_OF_RANGE = 1, 2, 3

_lock = threading.Lock()
_loaded: list[ctypes.CDLL | None] = []
_local = threading.local()

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def cache_dir() -> Path:
    root = os.environ.get("RAM_TRL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ram-trl"
    )
    return Path(root) / "native"


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on the first call; None when they cannot be had (the
    ``ram_trl.native`` logger says why, once, at INFO) or ``RAM_TRL_NATIVE=0``."""
    if os.environ.get("RAM_TRL_NATIVE", "1") == "0":
        return None
    with _lock:
        if not _loaded:
            _loaded.append(_load())
        return _loaded[0]


def _load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or "cc"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), *map(str.encode, FLAGS)]))
    target = cache_dir() / f"ram_at-{os.uname().machine}-{key.hexdigest()[:16]}.so"
    try:
        if not target.is_file():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        # info, not a warning: the torch path is correct, and a machine without a compiler
        # would otherwise print this line with every merge
        logger.info(
            "ram-trl: could not build its C kernels (%s); merges from snapshots take the torch "
            "path (same results, slower). RAM_TRL_NATIVE=0 skips the build.",
            str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__,
        )
        return None
    lib.ram_merge_at.restype = lib.ram_count_at.restype = ctypes.c_int
    lib.ram_row_offsets.restype = ctypes.c_int
    return lib


def _build(compiler: str, target: Path) -> None:
    if shutil.which(compiler) is None:
        raise OSError(f"no C compiler {compiler!r} on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    _reap(target.parent)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(tmp), str(SOURCE)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip() or done.returncode}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _reap(folder: Path) -> None:
    """Remove what builds killed half-way left (``.NAME.tmp-PID-HEX``, PID no longer alive).
    This package sits below ``ram_trl.io`` (``methods`` uses it), hence its own few lines."""
    for tmp in folder.glob(".*.tmp-*-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 2)[-2]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def _scratch() -> torch.Tensor:
    """This thread's zeroed block scratch (BLOCK float32 sums, then BLOCK byte counts): the
    kernels leave it zeroed."""
    buffer = getattr(_local, "scratch", None)
    if buffer is None:
        buffer = _local.scratch = torch.zeros(BLOCK * 5, dtype=torch.uint8)
    return buffer


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
    return (_P * len(tensors))(*[t.data_ptr() for t in tensors])


def _widths(indices: Sequence[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_int * len(indices))(*[int(i.dtype == torch.int64) for i in indices])


def _counts(indices: Sequence[torch.Tensor]) -> ctypes.Array:
    return (_I64 * len(indices))(*[i.numel() for i in indices])


def indexable(indices: Sequence[torch.Tensor]) -> bool:
    """The kernels read these: contiguous CPU int32/int64, fewer than 255 agents."""
    return len(indices) < 255 and all(
        i.dtype in (torch.int32, torch.int64) and i.is_contiguous() and i.device.type == "cpu"
        for i in indices
    )


def merge_at(
    lib: ctypes.CDLL,
    base: torch.Tensor,
    out: torch.Tensor,
    indices: Sequence[torch.Tensor],
    shift: int,
    values: Sequence[torch.Tensor],
    lambdas: Sequence[float],
    stored_epsilon: Sequence[float],
    epsilon: float,
) -> int:
    """``ram_merge_at`` of ram_at.c on flat contiguous CPU tensors: ``out`` (``base``'s dtype
    and size) becomes the merged rows; 0, or a status that the torch path must run."""
    agents = len(indices)
    status = lib.ram_merge_at(
        DTYPES[base.dtype], _I64(base.numel()), _P(base.data_ptr()), _P(out.data_ptr()),
        agents, _pointers(indices), _widths(indices), _counts(indices), _I64(shift),
        _pointers(values), (ctypes.c_float * agents)(*lambdas),
        (ctypes.c_float * agents)(*stored_epsilon), ctypes.c_float(epsilon),
        _P(_scratch().data_ptr()), (_I64 * (2 * agents))(),
    )  # fmt: skip
    return int(status)


def count_at(
    lib: ctypes.CDLL, numel: int, indices: Sequence[torch.Tensor], shift: int
) -> torch.Tensor | None:
    """The overlap histogram ``(N, N)`` int64 of ``numel`` elements from the agents' stored
    indices (``ram_count_at``), or None when an index is out of range (the torch path says)."""
    agents = len(indices)
    hist = torch.zeros((agents, agents), dtype=torch.int64)
    status = lib.ram_count_at(
        _I64(numel), agents, _pointers(indices), _widths(indices), _counts(indices),
        _I64(shift), _P(hist.data_ptr()), _P(_scratch().data_ptr()), (_I64 * (2 * agents))(),
    )  # fmt: skip
    return hist if status == 0 else None


def row_offsets(
    lib: ctypes.CDLL, indices: torch.Tensor, row_numel: int, rows: int
) -> torch.Tensor | None:
    """``offsets[r]`` (int64, ``rows + 1``): where row ``r`` starts in a tensor's sorted
    stored ``indices`` (``ram_row_offsets``), or None when they are not strictly increasing
    within the tensor (the torch path says so)."""
    offsets = torch.empty(rows + 1, dtype=torch.int64)
    status = lib.ram_row_offsets(
        _P(indices.data_ptr()), int(indices.dtype == torch.int64), _I64(indices.numel()),
        _I64(row_numel), _I64(rows), _P(offsets.data_ptr()),
    )  # fmt: skip
    return offsets if status == 0 else None
