"""The TRL / transformers integration: ``RAMCallback`` maps a ``Trainer``'s hooks onto an
:class:`~ram_trl.training.AgentRun` (one per agent's trainer, all sharing a store).

This package is the only one that knows ``transformers.Trainer``; everything it does is
:mod:`ram_trl.training`'s. Names are imported lazily: importing ``ram_trl.callback`` does not
import transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "RAMCallback": "ram_trl.callback.callback",
    "attach": "ram_trl.callback.callback",
    "RAMConfig": "ram_trl.training.config",
    "EvalTask": "ram_trl.evaluation",
    "merge_snapshots": "ram_trl.training.jobs",
    "latest_snapshots": "ram_trl.training.jobs",
}

if TYPE_CHECKING:  # pragma: no cover
    from ram_trl.callback.callback import RAMCallback, attach
    from ram_trl.evaluation import EvalTask
    from ram_trl.training.config import RAMConfig
    from ram_trl.training.jobs import latest_snapshots, merge_snapshots

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
