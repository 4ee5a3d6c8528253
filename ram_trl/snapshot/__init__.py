"""Task-vector snapshots of RL agents and a snapshot store shared by training and merge jobs.

* :class:`TaskVector`: an agent's changes relative to its base (elements with ``|tau| >
  epsilon``), sparse or dense per tensor, exact to apply; :func:`snapshot_folders` writes one
  straight from two checkpoint folders.
* :class:`TaskVectorSource`: a snapshot read lazily as if it were the agent's checkpoint, which
  is what the merge engine consumes.
* :class:`SnapshotStore`: ``agents/<agent>/step-<N>/`` with atomic publishing for many writers.
* :func:`fingerprint_of` (a folder or a state dict): which base a task vector belongs to.

Names are imported lazily so that ``ram-trl --help`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "TaskVector": "ram_trl.snapshot.task_vector",
    "TaskVectorSource": "ram_trl.snapshot.source",
    "TensorDelta": "ram_trl.snapshot.task_vector",
    "snapshot_folders": "ram_trl.snapshot.task_vector",
    "Manifest": "ram_trl.snapshot.format",
    "TensorEntry": "ram_trl.snapshot.format",
    "validate": "ram_trl.snapshot.format",
    "SnapshotStore": "ram_trl.snapshot.store",
    "SnapshotRef": "ram_trl.snapshot.store",
    "SnapshotInfo": "ram_trl.snapshot.store",
    "fingerprint_of": "ram_trl.snapshot.fingerprint",
    "fingerprint_folder": "ram_trl.snapshot.fingerprint",
    "fingerprint_state_dict": "ram_trl.snapshot.fingerprint",
    "resolve_store_agents": "ram_trl.snapshot.store",
}

if TYPE_CHECKING:  # pragma: no cover
    from ram_trl.snapshot.fingerprint import (
        fingerprint_folder,
        fingerprint_of,
        fingerprint_state_dict,
    )
    from ram_trl.snapshot.format import Manifest, TensorEntry, validate
    from ram_trl.snapshot.source import TaskVectorSource
    from ram_trl.snapshot.store import (
        SnapshotInfo,
        SnapshotRef,
        SnapshotStore,
        resolve_store_agents,
    )
    from ram_trl.snapshot.task_vector import TaskVector, TensorDelta, snapshot_folders

__all__ = [
    "Manifest",
    "SnapshotInfo",
    "SnapshotRef",
    "SnapshotStore",
    "TaskVector",
    "TaskVectorSource",
    "TensorDelta",
    "TensorEntry",
    "fingerprint_folder",
    "fingerprint_of",
    "fingerprint_state_dict",
    "resolve_store_agents",
    "snapshot_folders",
    "validate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ram_trl.snapshot' has no attribute {name!r}")
