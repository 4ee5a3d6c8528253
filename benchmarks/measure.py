"""Measuring a whole command from outside: wall time from spawn to reap, CPU time, peak RSS of
its process tree, and the page-cache state every run starts from.

Imports no torch: exec hands the parent's peak RSS on to every child's ``ru_maxrss``, so the
measuring process must stay small.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout is only the markdown report."""
    print(msg, file=sys.stderr, flush=True)


def drop_caches_works() -> bool:
    """True if we may write /proc/sys/vm/drop_caches (root on a VM, not in most containers)."""
    return os.access(DROP_CACHES, os.W_OK)


def prepare_cache(mode: str, files: Sequence[Path]) -> None:
    """Put the page cache into the same state before every measurement.

    ``sync`` first so that dirty pages of the previous run's output are not written back during
    the next measurement. ``warm`` then reads every input file once; ``cold`` drops the cache.
    """
    os.sync()
    if mode == "cold":
        DROP_CACHES.write_text("3\n")
        return
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


class TreeRssSampler(threading.Thread):
    """Periodically sums RSS over a process and all its descendants.

    ``ru_maxrss`` from ``wait4`` covers the child and the descendants it reaped, but as a max
    over processes, not a sum: workers running side by side would be under-reported. Sampling
    the whole tree catches that (but can miss spikes shorter than the interval), so the report
    uses the larger of the two. The anon/file split shows how much is mmapped file pages.

    Kept cheap because it shares the CPUs with the command being measured: the process tree is
    rescanned from /proc only every ``rescan`` samples (~2 ms each) and RSS is read from the
    one-line ``/proc/<pid>/statm`` (~10 us per process): well under 1% of a core.
    """

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, root_pid: int, interval: float = 0.1, rescan: int = 5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.rescan = root_pid, interval, rescan
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        n = 0
        while not self._halt.is_set():
            if n % self.rescan == 0:
                pids = self._tree()
            self._sample(pids)
            n += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _sample(self, pids: list[int]) -> None:
        rss = shared = 0
        for pid in pids:
            statm = _read_proc(f"/proc/{pid}/statm").split()
            if len(statm) >= 3:  # else the process is gone
                rss += int(statm[1]) * self.PAGE
                shared += int(statm[2]) * self.PAGE  # RssFile + RssShmem
        for key, value in (("rss", rss), ("anon", rss - shared), ("file", shared)):
            self.peak[key] = max(self.peak[key], value)
        self.max_procs = max(self.max_procs, len(pids))

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = _read_proc(f"/proc/{entry.name}/stat")
                if stat:
                    ppid = int(stat.rsplit(b")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree


def _read_proc(path: str) -> bytes:
    """Raw read of a small /proc file; b"" if the process has gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


@dataclasses.dataclass
class Measurement:
    """One timed run of a command."""

    wall_s: float
    returncode: int
    cpu_s: float  # user + system time of the child and the descendants it reaped
    ru_maxrss: int  # bytes, max over the child and the descendants it reaped
    tree_peak: dict[str, int]  # bytes, sampled sums over the live process tree
    max_procs: int
    stdout: Path
    stderr: Path

    @property
    def peak_rss(self) -> int:
        return max(self.ru_maxrss, self.tree_peak["rss"])


def measure(cmd: Sequence[str], logs: Path, label: str, stream_stderr: bool = False) -> Measurement:
    """Run ``cmd`` from the repo root; time it from spawn to reap (so interpreter start-up and
    imports count) and record the peak RSS of its process tree. Output goes to log files, or
    with ``stream_stderr`` both streams go to our stderr (stdout is kept for the report)."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        sinks = (sys.stderr, sys.stderr) if stream_stderr else (out, err)
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, stdout=sinks[0], stderr=sinks[1])
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    return Measurement(
        wall_s=wall,
        returncode=proc.returncode,
        cpu_s=usage.ru_utime + usage.ru_stime,
        ru_maxrss=usage.ru_maxrss * 1024,  # KiB on Linux
        tree_peak=sampler.peak,
        max_procs=sampler.max_procs,
        stdout=out_path,
        stderr=err_path,
    )


def environment() -> dict[str, Any]:
    """Versions and machine facts for the report header, found without importing torch here
    (see the module docstring for why this process stays small)."""
    from importlib.metadata import PackageNotFoundError, version

    def dist_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    init = (REPO_ROOT / "ram_trl" / "__init__.py").read_text()
    match = re.search(r"^__version__ = [\"']([^\"']+)", init, re.MULTILINE)
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "safetensors": dist_version("safetensors"),
        "ram_trl": match.group(1) if match else "unknown",
        "git": git or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "platform": platform.platform(),
    }


def cache_description(args: argparse.Namespace, input_bytes: int) -> str:
    """How the page cache was prepared, stated in the report because it changes every number."""
    can_drop = "writable" if drop_caches_works() else "not writable"
    if args.cache == "cold":
        return f"cold: sync + drop_caches before every measurement ({DROP_CACHES} {can_drop})"
    avail = _mem_available()
    text = (
        f"warm: sync, then every input file read once right before every measurement "
        f"(caches not dropped; {DROP_CACHES} is {can_drop}, so --cache cold is "
        f"{'available' if drop_caches_works() else 'unavailable'})"
    )
    if input_bytes > 0.8 * avail:
        text += f"; WARNING inputs ({input_bytes / GIB:.1f} GiB) may not fit the page cache"
    return text


def own_peak_rss() -> int:
    """This process's VmHWM in bytes (a lower bound on every child's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0
