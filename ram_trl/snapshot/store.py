"""A snapshot store shared by the training jobs of a multi-agent run and the merges that follow.

Layout (one filesystem, several writers)::

    <root>/store.json                    format version and the base fingerprint of every entry
    <root>/.lock                         flock'ed around publishing, pruning and store.json updates
    <root>/agents/<agent>/step-<N>/      one task-vector snapshot (manifest.json + safetensors)
    <root>/merged/merge-<N>/             merged models, one per store state (``snapshot.merged``)
    <root>/merged/latest                 symlink to the newest complete merged model

Every entry is written into a hidden temporary sibling (``.tmp-...``), fsync'ed, and renamed into
place, so readers (who take no lock) see a complete entry or none. Writers of different agents,
or of the same agent, proceed concurrently and only serialise for the rename. A writer holds an
flock on its temporary folder's ``.lock`` file while it works: the kernel drops it when the
writer dies, which is how :meth:`SnapshotStore.clean` tells an abandoned temporary folder (a
job killed mid-write) from one still being written.

``replace=True`` swaps an existing entry in one atomic exchange under the lock (Linux
``renameat2``; elsewhere two renames, between which the step is missing for a moment), never a
partial entry. Readers that race a writer (``latest``, ``list``, :func:`open_store_agents`)
look again when an entry changes identity under them, so they see the old entry or the new one.
Deleting (``prune``, ``remove``) renames the entry to a hidden ``.trash-*`` folder first.

Corrupt entries never break the store: :meth:`~SnapshotStore.list` reports them with their error,
:meth:`~SnapshotStore.latest` skips them (with a warning) and returns the newest valid snapshot,
and :meth:`~SnapshotStore.get` of one raises an InputError naming it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl import threads
from ram_trl.errors import InputError, OutputError, OutputExistsError, describe_os_error
from ram_trl.io import SAFE_NAME, check_name, fsync_path, replace_file
from ram_trl.io.atomic import exchange, hold_lock_file, reap_stale
from ram_trl.snapshot.format import MANIFEST, Manifest, lock_entry, validate, verify_checksums

STORE_FILE = "store.json"
STORE_FORMAT = "ram-trl.snapshot-store"
STORE_VERSION = 1
_STEP = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class SnapshotRef:
    """Where one agent's snapshot at one training step lives."""

    agent: str
    step: int
    path: Path

    def manifest(self) -> Manifest:
        return validate(self.path)

    def open(self, base: Any, *, verify_base: bool = True) -> Any:
        """A :class:`~ram_trl.snapshot.task_vector.TaskVectorSource` over ``base``."""
        from ram_trl.snapshot.source import TaskVectorSource

        return TaskVectorSource(self.path, base, verify_base=verify_base)

    def load(self) -> Any:
        """The whole snapshot as an in-memory :class:`~ram_trl.snapshot.TaskVector`."""
        from ram_trl.snapshot.task_vector import TaskVector

        return TaskVector.load(self.path)


@dataclass(frozen=True)
class SnapshotInfo(SnapshotRef):
    """A listing row. ``error`` is set (and the statistics are None) for a corrupt entry."""

    size: int = 0  # bytes on disk
    nnz: int | None = None
    numel: int | None = None
    density: float | None = None
    created: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None


def _step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"step must be an integer >= 0, got {step!r}")
    return step


#: how long a reader keeps retrying an entry that writers keep replacing (seconds)
RETRY_SECONDS = 10.0


def _inode(path: Path) -> tuple[int, int, int] | None:
    """The identity of the folder now at ``path`` (None when nothing is there): an entry is
    immutable once published, so a changed identity means it was replaced or removed. The
    change time is part of it because ext4 hands a freed inode number to the next new folder:
    an entry replaced twice while it was read can come back with the same number."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _backoff(attempt: int) -> None:
    time.sleep(min(0.001 * 2**attempt, 0.05))


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class SnapshotStore:
    """A folder of task-vector snapshots, ``agents/<agent>/step-<N>/``, safe for several
    concurrent writers on one filesystem (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, *, create: bool = True):
        self.root = Path(root)
        if not (self.root / STORE_FILE).is_file():
            if not create:
                raise InputError(f"{self.root} is not a snapshot store (no {STORE_FILE})")
            self.root.mkdir(parents=True, exist_ok=True)
            with self._locked():
                if not (self.root / STORE_FILE).is_file():
                    info = {"format": STORE_FORMAT, "format_version": STORE_VERSION}
                    self._write_info({**info, "base_fingerprint": None, "base_path": None})
        for sub in ("agents", "merged"):
            (self.root / sub).mkdir(exist_ok=True)
        self._read_info()

    def __repr__(self) -> str:
        return f"SnapshotStore({str(self.root)!r})"

    # -- store.json and the lock -------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # read-only (an archived store), or no permission
            raise OutputError(
                f"cannot change the snapshot store {self.root}: {describe_os_error(e)}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read_info(self) -> dict[str, Any]:
        path = self.root / STORE_FILE
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"store file {path} is unreadable or not JSON: {e}") from None
        if not isinstance(info, dict) or info.get("format") != STORE_FORMAT:
            raise InputError(f"{path} is not a ram-trl snapshot store file")
        if info.get("format_version") != STORE_VERSION:
            raise InputError(
                f"{path} has format version {info.get('format_version')!r}; this ram-trl reads "
                f"version {STORE_VERSION}"
            )
        return info

    def _write_info(self, info: dict[str, Any]) -> None:
        replace_file(self.root / STORE_FILE, (json.dumps(info, indent=1) + "\n").encode())

    @property
    def base_fingerprint(self) -> str | None:
        """The fingerprint every snapshot of this store was taken against (None while empty)."""
        return self._read_info().get("base_fingerprint")

    @property
    def base_path(self) -> str | None:
        """Where the base model was when the store recorded it (None while empty)."""
        return self._read_info().get("base_path")

    def check_base(
        self,
        fingerprint: str,
        where: str | os.PathLike,
        base_path: str | None = None,
        *,
        record: bool = True,
    ) -> None:
        """Raise unless ``fingerprint`` (of the base or snapshot at ``where``, taken against the
        base at ``base_path`` if known) is the store's; the first call on a new store records it,
        unless ``record`` is false (a check before a write that may still fail: a new store is
        bound only when its first entry is published)."""
        if not record:
            self._check_base_locked(fingerprint, where, base_path, record=False)
            return
        with self._locked():
            self._check_base_locked(fingerprint, where, base_path)

    def _check_base_locked(
        self, fingerprint: str, where: Any, base_path: str | None, *, record: bool = True
    ) -> None:
        info = self._read_info()
        ours = info.get("base_fingerprint")
        if ours is None and not record:
            return
        if ours is None:
            recorded = {"base_fingerprint": fingerprint, "base_path": base_path}
            self._write_info({**info, **recorded})
        elif ours != fingerprint:
            theirs = f" (base {base_path})" if base_path else ""
            raise InputError(
                f"{where} was taken against base fingerprint {fingerprint}{theirs}, but the store "
                f"{self.root} holds task vectors of base {ours} (first recorded from "
                f"{info.get('base_path')}): use one store per base model"
            )

    # -- reading -----------------------------------------------------------------------------

    def _agent_dir(self, agent: str) -> Path:
        return self.root / "agents" / check_name(agent, "agent")

    def agents(self) -> list[str]:
        """Agents with at least one snapshot entry, sorted (stray folders are ignored)."""
        folders = (p.name for p in (self.root / "agents").iterdir() if SAFE_NAME.fullmatch(p.name))
        return sorted(name for name in folders if self.steps(name))

    def steps(self, agent: str) -> list[int]:
        """The agent's published steps (valid or not), ascending."""
        folder = self._agent_dir(agent)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP.match(p.name)))

    def path(self, agent: str, step: int) -> Path:
        return self._agent_dir(agent) / f"step-{_step(step)}"

    def get(self, agent: str, step: int) -> SnapshotRef:
        """The snapshot of ``agent`` at ``step``; InputError if it is missing or corrupt."""
        path = self.path(agent, step)
        if not path.is_dir():
            have = self.steps(agent)
            raise InputError(
                f"store {self.root} has no snapshot of agent {agent!r} at step {step} "
                f"(steps: {have or 'none'})"
            )
        validate(path)
        return SnapshotRef(agent, step, path)

    def latest(self, agent: str) -> SnapshotRef | None:
        """The agent's newest *valid* snapshot, or None when it has none. Corrupt newer entries
        are skipped with a warning naming them (see :meth:`list` for their errors).

        Safe against concurrent writers: an entry that fails to validate because it was pruned
        or replaced meanwhile (its folder changed identity) is not corrupt; the lookup starts
        again, so a reader gets the old entry or the new one, never an error."""
        deadline = time.monotonic() + RETRY_SECONDS
        for attempt in range(1_000_000):
            ref, raced = self._latest_once(agent, last=time.monotonic() > deadline)
            if not raced:
                return ref
            _backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _latest_once(self, agent: str, *, last: bool) -> tuple[SnapshotRef | None, bool]:
        """``(newest valid entry, False)``, or ``(None, True)`` when a writer raced the read."""
        steps = self.steps(agent)
        for step in reversed(steps):
            path = self.path(agent, step)
            before = _inode(path)
            try:
                validate(path)
            except (InputError, OSError) as e:
                if (before is None or _inode(path) != before) and not last:
                    return None, True  # removed or replaced while we looked: look again
                warnings.warn(f"skipping corrupt snapshot: {e}", stacklevel=3)
                continue
            return SnapshotRef(agent, step, path), False
        # a step being replaced can be missing from one listing: if the listing changed, again
        return None, bool(steps) and self.steps(agent) != steps and not last

    def info(self, agent: str, step: int, *, verify: bool = False) -> SnapshotInfo:
        """One listing row; with ``verify``, every byte is checked against the manifest's
        checksums (see ``ram-trl store ls --verify``). An entry that a concurrent prune removes
        meanwhile is reported missing, one replaced meanwhile is read again."""
        path = self.path(agent, step)
        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while True:
            before = _inode(path)
            try:
                size = _dir_size(path)
                m = validate(path)
                if verify:
                    verify_checksums(path, m)
            except (InputError, OSError) as e:
                after = _inode(path)
                if after is not None and after != before and time.monotonic() < deadline:
                    _backoff(attempt)
                    attempt += 1
                    continue
                return SnapshotInfo(agent, step, path, error=str(e))
            return SnapshotInfo(
                agent, step, path, size, m.nnz, m.numel, m.density, m.created, m.metrics
            )

    def list(self, *, verify: bool = False) -> list[SnapshotInfo]:
        """Every entry, by agent then step; corrupt ones included with ``error`` set. Entries
        that a concurrent prune removed while they were being listed are left out."""
        rows = []
        for agent in self.agents():
            for step in self.steps(agent):
                row = self.info(agent, step, verify=verify)
                if row.valid or _inode(row.path) is not None:
                    rows.append(row)
        return rows

    def merged_dir(self, name: str) -> Path:
        """Where a merged model named ``name`` goes; publish it with ``atomic_directory``."""
        return self.root / "merged" / check_name(name, "merged model")

    @property
    def merged(self) -> Any:
        """The store's merged entries (:class:`~ram_trl.snapshot.merged.MergedEntries`): claims,
        ``latest``, retention."""
        from ram_trl.snapshot.merged import MergedEntries

        return MergedEntries(self)

    # -- writing -----------------------------------------------------------------------------

    def put(
        self,
        snapshot: Any,
        agent: str,
        step: int,
        *,
        replace: bool = False,
        max_shard_size: int | str | None = None,
    ) -> Path:
        """Publish a snapshot of ``agent`` at ``step`` atomically; returns its path.

        ``snapshot`` is a :class:`~ram_trl.snapshot.TaskVector` or a callback ``write(dir)`` that
        writes one into the given empty folder (e.g. ``lambda d: snapshot_folders(base, ckpt,
        d)``), so that a large snapshot streams straight into the store. The manifest's agent and
        step are filled in (a different one is an error), and its base fingerprint must be the
        store's. An existing step is an InputError unless ``replace``; concurrent writers of one
        step never corrupt it: one wins (or, with ``replace``, the last one).
        """
        final = self.path(agent, step)
        if final.exists() and not replace:
            raise OutputExistsError(f"{final} already exists")
        try:
            return self._put(snapshot, agent, step, final, replace, max_shard_size)
        except OSError as e:
            if isinstance(e, (InputError, OutputError)):
                raise
            raise OutputError(f"cannot write {final}: {describe_os_error(e)}") from None

    def _put(
        self,
        snapshot: Any,
        agent: str,
        step: int,
        final: Path,
        replace: bool,
        max_shard_size: int | str | None,
    ) -> Path:
        expected = getattr(snapshot, "base_fingerprint", None)
        if expected is not None and self.base_fingerprint not in (None, expected):
            where = f"the task vector of agent {agent!r}"
            self.check_base(expected, where, getattr(snapshot, "base_path", None))
        final.parent.mkdir(parents=True, exist_ok=True)
        token = f".tmp-{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp, lock_path = final.parent / token, final.parent / f"{token}.lock"
        lock = hold_lock_file(lock_path)  # held while writing: see clean()
        try:
            tmp.mkdir()
            self._write(snapshot, tmp, max_shard_size)
            manifest = self._finish_manifest(tmp, agent, step)
            while not self._publish(tmp, final, replace, manifest):
                pass  # an entry appeared at ``final`` while we waited for its readers: again
            return final
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            os.close(lock)

    @staticmethod
    def _write(snapshot: Any, tmp: Path, max_shard_size: int | str | None) -> None:
        kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        if hasattr(snapshot, "save"):
            snapshot.save(tmp, **kwargs)
        elif callable(snapshot):
            snapshot(tmp)
        else:
            raise TypeError(f"put() takes a TaskVector or a callback, got {type(snapshot)}")

    @staticmethod
    def _finish_manifest(tmp: Path, agent: str, step: int) -> Manifest:
        manifest = validate(tmp)
        for key, want in (("agent", agent), ("step", step)):
            have = getattr(manifest, key)
            if have is not None and have != want:
                raise InputError(f"the snapshot written for {agent}@{step} says {key} {have!r}")
        if (manifest.agent, manifest.step) != (agent, step):
            manifest.agent, manifest.step = agent, step
            (tmp / MANIFEST).unlink()
            manifest.write(tmp)
        fsync_path(tmp)
        return manifest

    def _publish(self, tmp: Path, final: Path, replace: bool, manifest: Manifest) -> bool:
        # Replacing waits (outside the store lock) until no reader holds the old entry.
        guard = lock_entry(final, shared=False) if replace else -1
        try:
            with self._locked():
                self._check_base_locked(manifest.base_fingerprint, final, manifest.base_path)
                if guard == -1 and replace and (final / MANIFEST).exists():
                    return False
                trash = None
                if final.exists():
                    if not replace:
                        message = f"{final} already exists (another writer was first)"
                        raise OutputExistsError(message)
                    # one atomic swap where the system has it: readers never miss the step
                    trash = final.parent / f".trash-{final.name}-{secrets.token_hex(4)}"
                    if exchange(tmp, final):
                        os.rename(tmp, trash)
                    else:
                        os.rename(final, trash)
                        os.rename(tmp, final)
                else:
                    os.rename(tmp, final)
                fsync_path(final.parent)
        finally:
            if guard is not None and guard >= 0:
                os.close(guard)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return True

    def remove(self, agent: str, step: int, *, wait: bool = True) -> bool:
        """Delete one entry; it disappears atomically for readers. An entry being read (an open
        :class:`~ram_trl.snapshot.TaskVectorSource`) is waited for, or with ``wait=False`` left
        in place. Returns whether it was removed."""
        path = self.path(agent, step)
        guard = lock_entry(path, shared=False, wait=wait)
        if guard is None:
            return False
        try:
            with self._locked():
                if not path.exists():
                    return False
                trash = path.parent / f".trash-{path.name}-{secrets.token_hex(4)}"
                os.rename(path, trash)
        finally:
            if guard >= 0:
                os.close(guard)
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def prune(self, agent: str, keep_last: int) -> list[Path]:
        """Keep the ``keep_last`` newest valid snapshots of ``agent``; delete every entry older
        than the oldest of them (valid or corrupt). Corrupt entries newer than that are left for
        inspection, and so are entries being read at the moment. Returns the deleted paths."""
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise InputError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        steps = self.steps(agent)
        valid = [s for s in steps if self.info(agent, s).valid]
        if len(valid) <= keep_last:
            return []
        oldest_kept = valid[-keep_last]
        removed = []
        for step in steps:  # entries being read now are left for a later prune
            if step < oldest_kept and self.remove(agent, step, wait=False):
                removed.append(self.path(agent, step))
        self.clean()
        return removed

    def clean(self, orphan_age_s: float = 3600.0) -> list[Path]:
        """Delete what killed writers left behind: temporary folders whose writer no longer holds
        its lock (snapshots under ``agents/``, merges under ``merged/``), leftover ``.trash-*``
        folders, and temporary folders without a lock file older than ``orphan_age_s``. Safe to
        run while other jobs write. Returns what was deleted."""
        removed = reap_stale(self.root / "merged")  # merges killed mid-write
        for folder in (self.root / "agents").iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            for p in folder.iterdir():
                if p.name.startswith(".tmp-") and p.name.endswith(".lock"):
                    removed += self._reap(p)
                elif p.name.startswith(".trash-") or self._orphaned(p, orphan_age_s):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed + self.merged.clean(orphan_age_s)

    @staticmethod
    def _orphaned(tmp: Path, age_s: float) -> bool:
        """A temporary folder without a lock file, older than ``age_s`` (a reaper died)."""
        if not tmp.name.startswith(".tmp-") or Path(f"{tmp}.lock").exists():
            return False
        try:
            return time.time() - tmp.stat().st_mtime > age_s
        except FileNotFoundError:  # published or reaped meanwhile
            return False

    @staticmethod
    def _reap(lock_path: Path) -> list[Path]:
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except FileNotFoundError:
            return []
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            os.close(fd)
            return []
        tmp = lock_path.with_name(lock_path.name[: -len(".lock")])
        shutil.rmtree(tmp, ignore_errors=True)
        lock_path.unlink(missing_ok=True)
        os.close(fd)
        return [tmp]


def resolve_store_agents(store: SnapshotStore, specs: list[str]) -> dict[str, Path]:
    """Map ``NAME`` (newest valid snapshot) or ``NAME@STEP`` to snapshot folders; with no specs,
    every agent's newest valid snapshot. What ``ram-trl merge --store S --agent ...`` and
    ``MergeConfig(store=...)`` merge."""
    return {name: _resolve(store, name, step) for name, step in _parse_specs(store, specs)}


def open_store_agents(store: SnapshotStore, specs: list[str], base: Any) -> dict[str, Any]:
    """Like :func:`resolve_store_agents`, but each snapshot opened as a
    :class:`~ram_trl.snapshot.TaskVectorSource` over ``base``, whose shared lock then keeps the
    store from pruning or replacing it until it is closed.

    Resolving and opening race the store's writers: an entry pruned or replaced in between is
    resolved again (the replacement, or the previous complete step), never reported as an error;
    an entry that fails to open while it stays in place is really broken, and that is raised."""
    from ram_trl.snapshot.source import TaskVectorSource

    def open_one(name: str, step: int | None) -> Any:
        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while True:
            path = _resolve(store, name, step)
            before = _inode(path)
            try:
                return TaskVectorSource(path, base)
            except InputError:
                raced = before is None or _inode(path) != before
                if not raced or time.monotonic() > deadline:
                    raise
            _backoff(attempt)
            attempt += 1

    # Opening reads every stored byte once for its checksum; hashlib lets go of the GIL, so
    # the agents are opened side by side.
    specs_ = _parse_specs(store, specs)
    threads.prepare()
    with ThreadPoolExecutor(max(1, min(len(specs_), len(os.sched_getaffinity(0)), 4))) as pool:
        futures = [(name, pool.submit(open_one, name, step)) for name, step in specs_]
    opened: dict[str, Any] = {}
    failed: BaseException | None = None
    for name, future in futures:
        try:
            opened[name] = future.result()
        except BaseException as error:  # the first failure, in the specs' order, is raised
            failed = failed or error
    if failed is not None:
        for source in opened.values():
            source.close()
        raise failed
    return opened


def _parse_specs(store: SnapshotStore, specs: list[str]) -> list[tuple[str, int | None]]:
    """``NAME`` / ``NAME@STEP`` specs as ``(name, step or None)``; none means every agent."""
    if not specs:
        agents = store.agents()
        if not agents:
            raise InputError(f"store {store.root} has no snapshots to merge")
        specs = agents
    out: dict[str, int | None] = {}
    for spec in specs:
        name, sep, step_text = spec.partition("@")
        if name in out:
            raise InputError(f"agent {name!r} is given twice ({spec!r}): merge one step per agent")
        if sep and not step_text.isdigit():
            raise InputError(f"{spec!r}: the step after '@' must be an integer, as in {name}@100")
        out[name] = int(step_text) if sep else None
    return list(out.items())


def _resolve(store: SnapshotStore, name: str, step: int | None) -> Path:
    if step is not None:
        return store.get(name, step).path
    ref = store.latest(name)
    if ref is None and store.steps(name):
        raise InputError(
            f"every snapshot of agent {name!r} in store {store.root} is corrupt "
            "(see `ram-trl store ls`)"
        )
    if ref is None:
        known = ", ".join(store.agents()) or "none"
        raise InputError(f"store {store.root} has no agent {name!r} (agents: {known})")
    return ref.path
