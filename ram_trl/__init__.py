"""ram-trl: Reinforced Agent Merging (RAM, RAM+) for multi-agent RL post-training.

The top-level names are imported lazily so that ``ram-trl --help`` and small scripts start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "merge": "ram_trl.merging.engine",
    "probe": "ram_trl.probing",
    "MergeConfig": "ram_trl.merging.config",
    "RAMError": "ram_trl.errors",
    "InputError": "ram_trl.errors",
    "RAMCallback": "ram_trl.callback.callback",
    "RAMConfig": "ram_trl.training.config",
    "AgentRun": "ram_trl.training.run",
    "attach": "ram_trl.callback.callback",
    "EvalTask": "ram_trl.evaluation",
    "GenerationSettings": "ram_trl.evaluation",
    "evaluate": "ram_trl.evaluation",
    "search": "ram_trl.merging.search",
    "Candidate": "ram_trl.merging.search",
}

if TYPE_CHECKING:  # pragma: no cover
    from ram_trl.callback.callback import RAMCallback, attach
    from ram_trl.errors import InputError, RAMError
    from ram_trl.evaluation import EvalTask, GenerationSettings, evaluate
    from ram_trl.merging.config import MergeConfig
    from ram_trl.merging.engine import merge
    from ram_trl.merging.search import Candidate, search
    from ram_trl.probing import probe
    from ram_trl.training.config import RAMConfig
    from ram_trl.training.run import AgentRun

__all__ = [
    "AgentRun",
    "Candidate",
    "EvalTask",
    "GenerationSettings",
    "InputError",
    "MergeConfig",
    "RAMCallback",
    "RAMConfig",
    "RAMError",
    "__version__",
    "attach",
    "evaluate",
    "merge",
    "probe",
    "search",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # imported once
        return value
    raise AttributeError(f"module 'ram_trl' has no attribute {name!r}")
