"""Task-vector snapshots of RL agents and a snapshot store shared by training and merge jobs.

* :class:`TaskVector`: an agent's changes relative to its base (elements with ``|tau| >
  epsilon``), sparse or dense per tensor, exact to apply; :func:`snapshot_folders` writes one
  straight from two checkpoint folders.
* :class:`TaskVectorSource`: a snapshot read lazily as if it were the agent's checkpoint, which
  is what the merge engine consumes.
* :class:`SnapshotStore`: ``agents/<agent>/step-<N>/`` with atomic publishing for many writers;
  :func:`resolve_store_agents` picks snapshots by ``NAME`` or ``NAME@STEP``.
* :func:`fingerprint_of` (a folder or a state dict): which base a task vector belongs to.

Builds on :mod:`ram_trl.io` alone (and the change threshold of :mod:`ram_trl.methods`); the merge
engine and the training code build on it. The ``snapshot`` and ``store`` commands are
:mod:`ram_trl.cli.snapshot`.
"""

from __future__ import annotations

from ram_trl.snapshot.fingerprint import fingerprint_folder, fingerprint_of, fingerprint_state_dict
from ram_trl.snapshot.format import Manifest, TensorEntry, validate
from ram_trl.snapshot.source import TaskVectorSource
from ram_trl.snapshot.store import (
    SnapshotInfo,
    SnapshotRef,
    SnapshotStore,
    open_store_agents,
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
    "open_store_agents",
    "resolve_store_agents",
    "snapshot_folders",
    "validate",
]
