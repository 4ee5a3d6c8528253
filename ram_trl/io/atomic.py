"""Publishing on disk so that a crash never leaves half of something where readers look.

A folder is written as a hidden temporary sibling and renamed into place once complete
(:func:`atomic_directory`); a small file is written to a temporary name and renamed
(:func:`replace_file`). Everything is fsync'ed before it is published, and the parent folder
after, so a published name survives a power cut too.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ram_trl.errors import OutputExistsError


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
            remove(old)
        else:
            os.replace(tmp, final)
            fsync_path(final.parent)
    except BaseException:
        remove(tmp)
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
