"""Publishing on disk so that a crash never leaves half of something where readers look.

A folder is written as a hidden temporary sibling and renamed into place once complete
(:func:`atomic_directory`); a small file is written to a temporary name and renamed
(:func:`replace_file`). Everything is fsync'ed before it is published, and the parent folder
after, so a published name survives a power cut too.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ram_trl.errors import OutputError, OutputExistsError, RAMError, describe_os_error

#: ``.NAME.tmp-PID-HEX`` (being written), ``.NAME.old-PID-HEX`` (an overwritten output, until the
#: new one is in place) and ``.NAME.tmp-PID-HEX.lock`` (flock'ed by their writer)
_TEMPORARY = re.compile(
    r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<tag>(?P<pid>\d+)-[0-9a-f]{8})(?P<lock>\.lock)?"
)


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


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically: readers see the old content or the new one."""
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def remove(path: Path) -> None:
    """Delete a file or a folder tree, whichever ``path`` is; nothing when it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without it
        return None


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), so a
    reader of ``b`` finds the old entry or the new one, never nothing. Returns False where the
    system or filesystem cannot, and the caller falls back to two renames."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    old, new = os.fsencode(a), os.fsencode(b)
    if renameat2(_AT_FDCWD, old, _AT_FDCWD, new, _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), os.fsdecode(a), None, os.fsdecode(b))


def hold_lock_file(path: Path) -> int:
    """Create ``path`` and hold an exclusive flock on it (close the fd to release it).

    The kernel drops the lock when its holder dies, however it dies: a reaper that can take the
    lock knows the writer is gone. Retries if a reaper unlinked the file between open and flock.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def lock_is_held(path: Path) -> bool | None:
    """Whether a live process holds the flock of ``path`` (see :func:`hold_lock_file`); None
    when there is no such file."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _writer_is_dead(lock_path: Path, pid: int) -> bool:
    """Whether the writer of a temporary is gone: its lock file can be flock'ed (or, for a
    temporary without one, its PID is not alive on this host)."""
    held = lock_is_held(lock_path)
    if held is not None:
        return not held
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def reap_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries that killed writers left in ``parent`` (those of ``name`` only,
    when given); never one whose writer is alive. Returns what was removed (or restored).

    A writer killed between the two renames of an overwrite leaves ``final`` missing and the old
    output hidden as ``.NAME.old-TAG``: that one is renamed back, not deleted. Failures (a
    read-only folder, a concurrent reaper) are ignored: reaping is best effort.
    """
    parent = Path(parent)
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return []
    reaped = []
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match["lock"] or (name is not None and match["name"] != name):
            continue
        lock_path = parent / f".{match['name']}.tmp-{match['tag']}.lock"
        if not _writer_is_dead(lock_path, int(match["pid"])):
            continue
        path, final = Path(entry.path), parent / match["name"]
        try:
            if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
                os.replace(path, final)  # the overwrite died before publishing: undo it
            else:
                remove(path)
            lock_path.unlink(missing_ok=True)
        except OSError:
            continue
        reaped.append(path)
    return reaped


def _output_error(final: Path, error: OSError) -> OutputError:
    return OutputError(f"cannot write {final}: {describe_os_error(error)}")


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders created, deepest first, so that a failure can
    remove them again. A file in the way is an OutputError naming it."""
    missing = []
    for path in [folder, *folder.parents]:
        if path.is_dir():
            break
        if path.exists() or path.is_symlink():
            raise OutputError(f"cannot create {folder}: {path} exists and is not a folder")
        missing.append(path)
    created = []
    try:
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            created.insert(0, path)
    except OSError as error:
        _remove_empty(created)
        raise OutputError(f"cannot create {folder}: {describe_os_error(error)}") from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there), or gone
            return


@contextmanager
def atomic_directory(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; publish it there by rename only if the block
    succeeds.

    At every instant ``final`` is absent, the complete old folder or the complete new one: a crash
    or an exception never leaves a half-written model where a user (or ``from_pretrained``) looks.
    The temporary folder is a hidden sibling, so the rename stays on one filesystem. Its writer
    holds an flock on a sibling ``.lock`` file, so that the next run into the same folder (which
    calls :func:`reap_stale`) removes the temporaries of killed writers and only those. On any
    failure the temporary, its lock and the parent folders created for ``final`` are removed;
    an OSError (full disk, read-only folder) becomes an :class:`OutputError` naming ``final``.
    """
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{final} exists; pass --overwrite to replace it")
    created = _make_parents(final.parent)
    reap_stale(final.parent, final.name)
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    lock_path = final.parent / f".{final.name}.tmp-{tag}.lock"
    lock = -1
    try:
        lock = hold_lock_file(lock_path)
        tmp.mkdir()
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
            remove(old)
        else:
            os.replace(tmp, final)
            fsync_path(final.parent)
    except BaseException as error:
        remove(tmp)
        lock_path.unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(error, OSError) and not isinstance(error, RAMError):
            raise _output_error(final, error) from None
        raise
    finally:
        lock_path.unlink(missing_ok=True)
        if lock >= 0:
            os.close(lock)


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
