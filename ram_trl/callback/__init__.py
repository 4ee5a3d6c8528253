"""Task-vector snapshots and RAM merges inside TRL / transformers training.

``RAMCallback`` (one per agent's trainer, all sharing a store) snapshots the agent, merges the
store's agents into ``<store>/merged/`` and evaluates the result, checkpoint after checkpoint.
Names are imported lazily: importing ``ram_trl.callback`` does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "RAMCallback": "ram_trl.callback.callback",
    "attach": "ram_trl.callback.callback",
    "RAMConfig": "ram_trl.callback.config",
    "EvalTask": "ram_trl.evaluation",
    "merge_snapshots": "ram_trl.callback.merging",
    "latest_snapshots": "ram_trl.callback.merging",
}

if TYPE_CHECKING:  # pragma: no cover
    from ram_trl.callback.callback import RAMCallback, attach
    from ram_trl.callback.config import RAMConfig
    from ram_trl.callback.merging import latest_snapshots, merge_snapshots
    from ram_trl.evaluation import EvalTask

__all__ = [
    "EvalTask",
    "RAMCallback",
    "RAMConfig",
    "attach",
    "latest_snapshots",
    "merge_snapshots",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ram_trl.callback' has no attribute {name!r}")
