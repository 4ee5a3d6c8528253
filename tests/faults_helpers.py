"""Helpers for the reliability and fault-injection tests (``test_reliability.py``,
``test_faults.py``): run the real ``ram-trl`` command in a subprocess, check the error contract,
look for leftovers, and make a disk fill up or turn read-only.

The error contract of every user mistake and every environmental failure (full disk, read-only
folder, a bad file): exit code 2, exactly one line on stderr, ``ram-trl: error: ...``, naming the
path and the cause; no traceback; nothing partial left behind.

Only public entry points are used: the console script's ``ram_trl.cli:main`` and the names the
package exports, never internal module paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: the ``ram-trl`` console script, whatever module layout sits behind ``ram_trl.cli:main``
CLI = [sys.executable, "-c", "import sys; from ram_trl.cli import main; sys.exit(main())"]
#: seconds any single CLI call may take (a tiny merge takes about 1.5 s, mostly imports)
TIMEOUT = 120


@dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"ram-trl {' '.join(self.args)} -> rc {self.rc}\n{self.stdout}\n{self.stderr}"


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(
    *args: str | os.PathLike,
    timeout: float = TIMEOUT,
    cwd: str | os.PathLike | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> Result:
    """Run ``ram-trl ARGS`` to completion in a subprocess (always with a timeout)."""
    argv = [str(a) for a in args]
    proc = subprocess.run(
        [*CLI, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=cli_env(),
        preexec_fn=preexec_fn,
    )
    return Result(argv, proc.returncode, proc.stdout, proc.stderr)


def agent_args(agents: dict[str, Path]) -> list[str]:
    """``--agent NAME=PATH`` for every agent."""
    return [arg for name, path in agents.items() for arg in ("--agent", f"{name}={path}")]


def snapshot_args(base, model, store, agent: str, step: int = 0) -> list:
    """``snapshot --base B --model M --store S --agent A --step N``."""
    return ["snapshot", "--base", base, "--model", model, "--store", store, "--agent", agent,
            "--step", str(step)]  # fmt: skip


def start_ram_trl(*args: str | os.PathLike, cwd: str | os.PathLike | None = None):
    """Start ``ram-trl ARGS`` in the background (stdout/stderr to pipes)."""
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env=cli_env(),
    )


def assert_clean_error(result: Result, *needles: str | os.PathLike) -> str:
    """Exit code 2, exactly one stderr line ``ram-trl: error: ...`` holding every needle
    (case-insensitive), no traceback. Returns that line."""
    assert "Traceback" not in result.stderr, f"traceback instead of one clear line:\n{result}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.rc == 2, f"expected exit code 2:\n{result}"
    assert len(lines) == 1 and lines[0].startswith("ram-trl: error: "), (
        f"expected exactly one 'ram-trl: error:' line on stderr:\n{result}"
    )
    for needle in needles:
        assert str(needle).lower() in lines[0].lower(), f"{needle!r} not named in: {lines[0]}"
    return lines[0]


def names_key(text: str, key: str) -> bool:
    """``key`` appears in ``text`` as a whole word (so that a key ``r`` is not found in
    ``error``)."""
    return re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", text) is not None


def assert_names_any(line: str, *words: str, keys: Sequence[str] = ()) -> None:
    """The line names at least one of ``words`` (case-insensitive substrings) or ``keys`` (whole
    words)."""
    found = any(w.lower() in line.lower() for w in words) or any(names_key(line, k) for k in keys)
    assert found, f"none of {words} / keys {list(keys)} in: {line}"


def warning_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if "warn" in line.lower()]


# --- readers of a store that writers are changing ------------------------------------------


def strict_reads(store, agents: Sequence[str]) -> tuple[dict, list[str]]:
    """What a reader racing writers must always get: ``latest`` of every agent returns an entry,
    without exception or warning, and ``list`` shows no corrupt row (none is corrupt). Returns
    ``({agent: ref}, problems)``."""
    import warnings

    refs, problems = {}, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for agent in agents:
            try:
                refs[agent] = store.latest(agent)
            except Exception as e:
                problems.append(f"latest({agent!r}) raised {e!r}")
                continue
            if refs[agent] is None:
                problems.append(f"latest({agent!r}) returned None")
                del refs[agent]
        try:
            problems += [f"list() showed {r.path} as corrupt: {r.error}" for r in store.list()
                         if not r.valid]  # fmt: skip
        except Exception as e:
            problems.append(f"list() raised {e!r}")
    problems += [f"warning: {w.message}" for w in caught]
    return refs, problems


# --- the file system ------------------------------------------------------------------------


def tree(root: str | os.PathLike) -> dict[str, str]:
    """Every path under ``root`` (hidden ones included) -> sha256 of a file, or "dir"."""
    root = Path(root)
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir() and not path.is_symlink():
            out[rel] = "dir"
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "other"
    return out


def hidden_entries(folder: str | os.PathLike) -> set[str]:
    """Names of the hidden entries directly in ``folder`` (where temporaries live)."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.name.startswith(".")}


def leftovers(root: str | os.PathLike, keep: Sequence[str] = (".lock",)) -> list[str]:
    """Hidden files and folders anywhere under ``root`` (temporaries, trash; a hidden folder is
    listed, not its contents), except the names in ``keep`` (a store's own lock file)."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            if name.startswith(".") and name not in keep:
                found.append(str((Path(folder) / name).relative_to(root)))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def assert_store_unbound(root: str | os.PathLike) -> None:
    """No snapshot store at ``root``, or one with no snapshot and no base recorded: what a failed
    command may leave of a store it was asked to create (issue 9, item 4)."""
    from ram_trl.snapshot import SnapshotStore

    root = Path(root)
    if not (root / "store.json").exists():
        return
    store = SnapshotStore(root, create=False)
    assert store.base_fingerprint is None, f"the failed command bound {root} to a base"
    assert store.agents() == [], f"the failed command left entries in {root}"


def copy_model(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    shutil.copytree(src, dst)
    return Path(dst)


def finite_weights(folder: str | os.PathLike) -> tuple[int, int]:
    """(non-finite, total) floating-point elements over every safetensors file of ``folder``."""
    import torch
    from safetensors.torch import load_file

    bad = total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        for tensor in load_file(file).values():
            if tensor.is_floating_point():
                bad += int((~torch.isfinite(tensor.float())).sum())
                total += tensor.numel()
    return bad, total


# --- processes ------------------------------------------------------------------------------


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=TIMEOUT)
    return proc.pid


def stop_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 60.0) -> bool:
    """SIGSTOP ``proc`` as soon as ``ready()`` holds; False if it exited first. Polls often: a
    small merge writes for only a fraction of a second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGSTOP)
            if proc.poll() is None:
                return True
        if proc.poll() is not None:
            return False
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
    raise AssertionError(f"{proc.args} did not reach the state to interrupt in {timeout} s")


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)


def resume(proc: subprocess.Popen) -> tuple[int, str, str]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def writing_into(folder: str | os.PathLike, before: set[str], suffix: str = "") -> Callable:
    """``ready()`` for :func:`stop_when`: a new hidden entry of ``folder`` holds a non-empty file
    (ending in ``suffix``), i.e. a writer is mid-way through its temporary folder."""
    folder = Path(folder)

    def ready() -> bool:
        try:
            for entry in os.scandir(folder):
                if entry.name in before or not entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    for f in os.scandir(entry.path):
                        if f.name.endswith(suffix) and f.is_file() and f.stat().st_size > 0:
                            return True
        except FileNotFoundError:
            pass
        return False

    return ready


# --- full disks and read-only folders -------------------------------------------------------


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    try:
        done = subprocess.run(["mount", *args], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, timeout=30).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def small_tmpfs(path: str | os.PathLike, size: str) -> Iterator[Path | None]:
    """A tmpfs of ``size`` (e.g. ``"256k"``) mounted at ``path``; None where mounting is not
    possible (not root, no mount(8), a container without the capability)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)):
        yield None
        return
    try:
        yield path
    finally:
        _umount(path)


def file_size_limit(limit_bytes: int) -> Callable[[], None]:
    """A ``preexec_fn`` capping every file the child writes at ``limit_bytes`` (RLIMIT_FSIZE):
    a longer write fails with EFBIG, as a full quota would, once SIGXFSZ is ignored."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return limit


@contextlib.contextmanager
def read_only(path: str | os.PathLike) -> Iterator[str | None]:
    """Make ``path`` read-only for the duration: a read-only bind mount (EROFS) when root,
    otherwise removed write permissions (EACCES). Yields the cause a message should name
    (``"read-only"`` or ``"permission"``), or None when neither can be arranged."""
    path = Path(path)
    if _mount("--bind", str(path), str(path)):
        if _mount("-o", "remount,ro,bind", str(path)):
            try:
                yield "read-only"
            finally:
                _umount(path)
            return
        _umount(path)
    if os.geteuid() == 0:  # root ignores permission bits: nothing else would hold
        yield None
        return
    modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
    for p in modes:
        p.chmod(modes[p] & ~0o222)
    try:
        yield "permission"
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def strerror_words(code: int) -> tuple[str, ...]:
    """Ways an error line may state an OSError's cause: its strerror, or plain words."""
    extra = {28: ("no space", "disk full", "disk is full"), 27: ("too large", "file size")}
    return (os.strerror(code), f"errno {code}", *extra.get(code, ()))


def one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()
