"""RAM inside training, for any loop: :class:`AgentRun` takes theta_0, snapshots the live
weights, merges the store's agents and evaluates the result, rank-aware.

* :mod:`~ram_trl.training.run`: :class:`AgentRun`, the one class a loop calls;
* :mod:`~ram_trl.training.config`: :class:`RAMConfig`, what it does and when;
* :mod:`~ram_trl.training.capture`: theta_0 on disk, and snapshots of the live model;
* :mod:`~ram_trl.training.weights`: the live weights one tensor at a time (DDP, ZeRO-3, FSDP2,
  PEFT);
* :mod:`~ram_trl.training.jobs`: merges of the store's newest snapshots, one per store state,
  in process or in a subprocess (``python -m ram_trl.training.jobs JOB``);
* :mod:`~ram_trl.training.scoring`: evaluation inside training (the base once per store);
* :mod:`~ram_trl.training.watch`: the merge service behind ``ram-trl watch``.

Builds on :mod:`ram_trl.snapshot`, :mod:`ram_trl.merging`, :mod:`ram_trl.lora`,
:mod:`ram_trl.evaluation` and :mod:`ram_trl.distributed`; knows no trainer
(:mod:`ram_trl.callback` is the ``transformers.Trainer`` layer on top) and imports no
transformers until a model is loaded for evaluation.
"""

from __future__ import annotations

from ram_trl.training.config import RAMConfig
from ram_trl.training.jobs import MergeSettings, latest_snapshots, merge_snapshots, merge_store
from ram_trl.training.run import AgentRun

__all__ = [
    "AgentRun",
    "MergeSettings",
    "RAMConfig",
    "latest_snapshots",
    "merge_snapshots",
    "merge_store",
]
