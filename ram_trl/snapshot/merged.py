"""The merged models of a snapshot store: one entry per state of the store, shared by every job.

Layout, under ``<store>/merged/``::

    merge-000007/                   a merged model (or LoRA adapter), published atomically, with
      merge_inputs.json             the exact (agent, step) snapshots it combines and the settings
    latest -> merge-000007          a symlink, replaced atomically: the newest complete generalist
    .pending-merge-000008.json      a merge in progress: its inputs, flock'ed by the merging process

Entries are numbered by a store-wide sequence, never by one job's step: two jobs that merge at
their step 8 make one entry, not ``step-8`` and ``step-8-letters``. A merge first *claims* its
inputs (every agent's snapshot, identified by step and creation time, plus the method and its
settings) under the store lock: if an entry with the same inputs exists it is reused, if one is
being made (its marker's flock is held) the caller may wait for it, and otherwise the caller gets
the next sequence number and a marker of its own. The kernel drops the marker's flock when its
process dies, which is how :meth:`MergedEntries.clean` (and the next claim) tells an abandoned
merge from a running one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ram_trl.errors import InputError
from ram_trl.io import fsync_path
from ram_trl.io.atomic import lock_is_held

if TYPE_CHECKING:
    from ram_trl.snapshot.store import SnapshotRef, SnapshotStore

INPUTS_FILE = "merge_inputs.json"
INPUTS_FORMAT = "ram-trl.merged-entry"
LATEST = "latest"
_ENTRY = re.compile(r"^merge-(\d+)$")
_PENDING = re.compile(r"^\.pending-merge-(\d+)\.json$")


def entry_name(sequence: int) -> str:
    return f"merge-{sequence:06d}"


def inputs_key(inputs: Mapping[str, Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """What makes two merges the same: every input snapshot (agent, step, creation time) and
    the settings (method, parameters, dtype, output), as a short digest."""
    text = json.dumps({"inputs": inputs, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_inputs(refs: Mapping[str, SnapshotRef]) -> dict[str, dict[str, Any]]:
    """``{agent: {"step": N, "created": ISO time, "files": digest}}``. The digest of the
    manifest and of every file's size and modification time tells a snapshot from one that a
    resumed or overwritten run wrote later at the same step (without reading the tensors)."""
    from ram_trl.snapshot.format import MANIFEST

    out = {}
    for agent, ref in sorted(refs.items()):
        try:
            manifest = (ref.path / MANIFEST).read_bytes()
            files = sorted(
                (p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ref.path.iterdir()
            )
        except OSError as e:
            raise InputError(f"cannot read the snapshot {ref.path}: {e}") from None
        digest = hashlib.sha256(manifest + json.dumps(files).encode()).hexdigest()[:16]
        created = json.loads(manifest).get("created")
        out[agent] = {"step": ref.step, "created": created, "files": digest}
    return out


@dataclass(frozen=True)
class MergedEntry:
    """A complete merged model of the store and what it was made from."""

    name: str
    sequence: int
    path: Path
    inputs: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    key: str
    created: str | None = None

    @property
    def steps(self) -> dict[str, int]:
        """``{agent: step}`` of the snapshots it combines."""
        return {agent: int(i["step"]) for agent, i in self.inputs.items()}

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").is_file()

    def record(self) -> dict[str, Any]:
        return {
            "format": INPUTS_FORMAT,
            "sequence": self.sequence,
            "key": self.key,
            "inputs": self.inputs,
            "settings": self.settings,
            "created": self.created,
        }

    @classmethod
    def read(cls, path: Path) -> MergedEntry | None:
        """The entry at ``path``, or None when it has no readable record (not a store merge)."""
        match = _ENTRY.match(path.name)
        try:
            data = json.loads((path / INPUTS_FILE).read_text())
        except (OSError, ValueError):
            return None
        if match is None or not isinstance(data, dict) or data.get("format") != INPUTS_FORMAT:
            return None
        return cls(
            path.name,
            int(match.group(1)),
            path,
            data["inputs"],
            data["settings"],
            data["key"],
            data.get("created"),
        )


class MergeClaim:
    """The outcome of :meth:`MergedEntries.claim`.

    ``state`` is ``"done"`` (``entry`` exists with these inputs: reuse it), ``"running"``
    (another live process is making it: :meth:`wait` for it) or ``"new"`` (this process makes
    ``entry``: write the folder at ``entry.path`` with :meth:`record_bytes` as
    ``merge_inputs.json``, then :meth:`publish`; or :meth:`release` on failure).
    """

    def __init__(
        self,
        owner: MergedEntries,
        entry: MergedEntry,
        state: Literal["done", "running", "new"],
        marker: Path | None = None,
        fd: int | None = None,
    ) -> None:
        self.owner, self.entry, self.state, self.marker, self._fd = owner, entry, state, marker, fd

    def record_bytes(self) -> bytes:
        return (json.dumps(self.entry.record(), indent=1) + "\n").encode()

    def publish(self, keep_last: int | None = None) -> list[Path]:
        """After ``entry.path`` is written: point ``latest`` at it when it is the newest entry,
        drop the marker, and apply ``keep_last`` retention. Returns the entries removed."""
        if self.state != "new":
            raise RuntimeError(f"claim of {self.entry.name} is {self.state!r}, not 'new'")
        if MergedEntry.read(self.entry.path) is None:
            raise InputError(f"{self.entry.path} was not written with its {INPUTS_FILE}")
        with self.owner.store._locked():
            current = self.owner._pointed()
            if current is None or current.sequence < self.entry.sequence:
                self.owner._point_latest(self.entry.name)
            self.release()
        return [] if keep_last is None else self.owner.prune(keep_last)

    def release(self) -> None:
        """Drop the marker (a failed or finished merge); waiters wake up."""
        if self._fd is not None:
            if self.marker is not None:
                self.marker.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def wait(self, timeout: float | None = None) -> MergedEntry | None:
        """Block until the process making ``entry`` is done; the entry, or None when that
        process failed or died (claim again) or ``timeout`` seconds passed."""
        if self.state == "done":
            return self.entry
        assert self.marker is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.marker, os.O_RDONLY)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if deadline is not None and time.monotonic() > deadline:
                            return None
                        time.sleep(0.2)
            finally:
                os.close(fd)
        return MergedEntry.read(self.entry.path)


class MergedEntries:
    """``<store>/merged/``: claiming, publishing, listing, retention and cleaning of merged
    entries (see the module docstring). Obtained as ``SnapshotStore.merged``."""

    def __init__(self, store: SnapshotStore) -> None:
        self.store = store
        self.root = store.root / "merged"

    def entries(self) -> list[MergedEntry]:
        """Complete entries with a record, by sequence number."""
        found = (MergedEntry.read(p) for p in self._folders())
        return sorted((e for e in found if e is not None), key=lambda e: e.sequence)

    def _folders(self) -> Iterator[Path]:
        return (p for p in self.root.iterdir() if _ENTRY.match(p.name) and p.is_dir())

    def latest(self) -> MergedEntry | None:
        """The entry ``latest`` points at (the newest complete generalist), or None."""
        entry = self._pointed()
        if entry is not None:
            return entry
        entries = self.entries()  # the pointer was removed by hand, or not yet written
        return entries[-1] if entries else None

    def _pointed(self) -> MergedEntry | None:
        try:
            target = os.readlink(self.root / LATEST)
        except OSError:
            return None
        return MergedEntry.read(self.root / Path(target).name)

    def _point_latest(self, name: str) -> None:
        link = self.root / f".{LATEST}-{secrets.token_hex(4)}"
        os.symlink(name, link)  # relative: the store stays movable
        os.replace(link, self.root / LATEST)
        fsync_path(self.root)

    def claim(self, refs: Mapping[str, SnapshotRef], settings: Mapping[str, Any]) -> MergeClaim:
        """Reuse, wait for, or take on the merge of ``refs`` with ``settings`` (see
        :class:`MergeClaim`)."""
        inputs = describe_inputs(refs)
        settings = json.loads(json.dumps(dict(settings), sort_keys=True))
        key = inputs_key(inputs, settings)
        with self.store._locked():
            for entry in self.entries():
                if entry.key == key:
                    return MergeClaim(self, entry, "done")
            sequences = [int(m.group(1)) for p in self._folders() if (m := _ENTRY.match(p.name))]
            for marker in self.root.glob(".pending-merge-*.json"):
                match = _PENDING.match(marker.name)
                if match is None:
                    continue
                if not self._alive(marker):
                    self._reap(marker)
                    continue
                sequences.append(int(match.group(1)))
                with contextlib.suppress(OSError, ValueError, KeyError):
                    if json.loads(marker.read_text())["key"] == key:
                        name = entry_name(int(match.group(1)))
                        sequence = int(match.group(1))
                        path = self.root / name
                        entry = MergedEntry(name, sequence, path, inputs, settings, key)
                        return MergeClaim(self, entry, "running", marker)
            sequence = max(sequences, default=0) + 1
            name = entry_name(sequence)
            created = datetime.now(timezone.utc).isoformat(timespec="seconds")
            entry = MergedEntry(name, sequence, self.root / name, inputs, settings, key, created)
            marker = self.root / f".pending-{name}.json"
            fd = os.open(marker, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX)
            claim = MergeClaim(self, entry, "new", marker, fd)
            os.write(fd, claim.record_bytes())
            return claim

    @staticmethod
    def _alive(marker: Path) -> bool:
        """Whether the process that wrote ``marker`` still holds its flock."""
        return lock_is_held(marker) is True

    def _reap(self, marker: Path) -> list[Path]:
        """Remove a dead merge's marker and its half-written folder (call under the lock)."""
        name = marker.name.removeprefix(".pending-").removesuffix(".json")
        removed = [marker]
        for tmp in self.root.glob(f".{name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
        marker.unlink(missing_ok=True)
        return removed

    def prune(self, keep_last: int) -> list[Path]:
        """Keep the ``keep_last`` newest entries (and the one ``latest`` points at); delete the
        others, each renamed away first so a reader sees it whole or not at all."""
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise InputError(f"keep_last_merged must be an integer >= 1, got {keep_last!r}")
        removed = []
        with self.store._locked():
            entries, latest = self.entries(), self.latest()
            keep = {e.name for e in entries[-keep_last:]} | ({latest.name} if latest else set())
            for entry in entries:
                if entry.name in keep:
                    continue
                trash = self.root / f".trash-{entry.name}-{secrets.token_hex(4)}"
                os.rename(entry.path, trash)
                removed.append((entry.path, trash))
        for _, trash in removed:
            shutil.rmtree(trash, ignore_errors=True)
        return [path for path, _ in removed]

    def clean(self, orphan_age_s: float = 3600.0) -> list[Path]:
        """Delete what dead merges left: markers no process holds (with their temporary
        folders), ``.trash-*`` folders, stray ``latest`` links, temporary folders of no
        live marker, and anything else hidden older than ``orphan_age_s`` (e.g. the job files that
        older versions left). Safe while other jobs merge."""
        removed: list[Path] = []
        with self.store._locked():
            live = set()
            for marker in self.root.glob(".pending-merge-*.json"):
                if self._alive(marker):
                    live.add(marker.name.removeprefix(".pending-").removesuffix(".json"))
                else:
                    removed += self._reap(marker)
            now = time.time()
            for p in self.root.iterdir():
                if not p.name.startswith(".") or p.name.startswith(".pending-"):
                    continue
                owner, sep, _ = p.name[1:].partition(".tmp-")
                if owner in live:
                    continue
                try:
                    age = now - p.lstat().st_mtime
                except FileNotFoundError:
                    continue
                dead_tmp = bool(sep) and _ENTRY.match(owner) is not None
                stray_link = p.name.startswith(f".{LATEST}-") and age > 60
                if p.name.startswith(".trash-") or dead_tmp or stray_link or age > orphan_age_s:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        return removed
