"""The TRL / transformers integration: ``RAMCallback`` maps a ``Trainer``'s hooks onto an
:class:`~ram_trl.training.AgentRun` (one per agent's trainer, all sharing a store).

This package is the only one that knows ``transformers.Trainer``; everything it does is
:mod:`ram_trl.training`'s. ``RAMCallback`` and ``attach`` are imported when first used, so
importing ``ram_trl.callback`` does not import transformers.
"""

from __future__ import annotations

from typing import Any

from ram_trl.evaluation import EvalTask
from ram_trl.training import RAMConfig, latest_snapshots, merge_snapshots

__all__ = [
    "EvalTask",
    "RAMCallback",
    "RAMConfig",
    "attach",
    "latest_snapshots",
    "merge_snapshots",
]


def __getattr__(name: str) -> Any:
    if name in ("RAMCallback", "attach"):  # they import transformers
        from ram_trl.callback import callback

        return getattr(callback, name)
    raise AttributeError(f"module 'ram_trl.callback' has no attribute {name!r}")
