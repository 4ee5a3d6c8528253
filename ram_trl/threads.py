"""Worker threads that run torch ops, in any process, forked ones included."""

from __future__ import annotations

import os

import torch

_ready_in: int | None = None  # the process whose torch thread pool is settled


def prepare() -> None:
    """Settle torch's intra-op thread pool on this thread, once per process, before worker
    threads start running torch ops.

    In a process forked from one that used the pool, torch rebuilds it the first time a thread
    asks for it, and two threads asking at once can find none ("pool INTERNAL ASSERT FAILED ...
    Invalid thread pool!": a merge opening snapshots on threads in a forked reader hit it once).
    Asking here first, before any worker exists, rebuilds it alone. The thread count is set to
    what it already is."""
    global _ready_in
    if _ready_in != os.getpid():
        torch.set_num_threads(torch.get_num_threads())
        _ready_in = os.getpid()
