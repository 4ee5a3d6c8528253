"""Launching real multi-process jobs from tests: a free port, a wall-clock timeout that ends
every rank, and the one known flake of a launch on this machine.

torch's elastic agent (torchrun, ``accelerate launch``) starts each rank in a session of its
own; :func:`run_launch` starts the launcher in a new process group and, on a timeout, kills the
launcher and every descendant, so a hung rank fails its test instead of CI.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: a rank that finished may abort in C++ teardown at interpreter exit with this line (about once
#: in ten launches under load, never reproduced alone): the launch is then run once more
TEARDOWN_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc: subprocess.Popen) -> None:
    """End the launcher and its ranks. torch's elastic agent starts each rank in a session of
    its own, so killing the launcher's process group would leave them running (holding the
    output pipe, so communicate() would never return): collect the descendants first."""
    try:
        import psutil

        ranks = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # no psutil, or the launcher is gone
        ranks = []
    os.killpg(proc.pid, signal.SIGTERM)  # the elastic agent forwards it to the ranks
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    for child in ranks:
        with contextlib.suppress(Exception):  # already gone
            child.kill()


def launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a launch: offline, single-threaded, the source tree importable."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **(extra or {}),
    }


def run_launch(
    cmd: Sequence[str], *, env: dict[str, str], timeout: float, label: str
) -> tuple[int, str, float]:
    """Run ``cmd`` (a launcher) to its end: (exit code, output, seconds); the test fails with
    the output's tail when it has not exited within ``timeout`` seconds."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends every rank
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        log, _ = proc.communicate()
        pytest.fail(f"{label}: no exit after {timeout} s (a hung rank?)\n{log[-4000:]}")
    return proc.returncode, log, time.perf_counter() - started
