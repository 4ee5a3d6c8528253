"""RAM inside training, for any loop: :class:`AgentRun` takes theta_0, snapshots the live
weights, merges the store's agents and evaluates the result, rank-aware.

* :mod:`~ram_trl.training.run`: :class:`AgentRun`, the one class a loop calls;
* :mod:`~ram_trl.training.config`: :class:`RAMConfig`, what it does and when;
* :mod:`~ram_trl.training.capture`: theta_0 on disk, and snapshots of the live model;
* :mod:`~ram_trl.training.weights`: the live weights one tensor at a time (DDP, ZeRO-3, FSDP2,
  PEFT);
* :mod:`~ram_trl.training.jobs`: merges of the store's newest snapshots, in process or in a
  subprocess.

Builds on :mod:`ram_trl.snapshot`, :mod:`ram_trl.merging`, :mod:`ram_trl.lora`,
:mod:`ram_trl.evaluation` and :mod:`ram_trl.distributed`; knows no trainer
(:mod:`ram_trl.callback` is the ``transformers.Trainer`` layer on top). Names are imported
lazily, so a background merge (``python -m ram_trl.training.jobs``) starts lean.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "AgentRun": "ram_trl.training.run",
    "RAMConfig": "ram_trl.training.config",
    "merge_snapshots": "ram_trl.training.jobs",
    "latest_snapshots": "ram_trl.training.jobs",
}

if TYPE_CHECKING:  # pragma: no cover
    from ram_trl.training.config import RAMConfig
    from ram_trl.training.jobs import latest_snapshots, merge_snapshots
    from ram_trl.training.run import AgentRun

__all__ = ["AgentRun", "RAMConfig", "latest_snapshots", "merge_snapshots"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ram_trl.training' has no attribute {name!r}")
