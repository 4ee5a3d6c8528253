"""Merging checkpoints and snapshots: open and validate the inputs, stream them chunk by chunk,
ask the method, write the output, report what was done.

* :mod:`~ram_trl.merging.inputs`: one base and N agents, checked from their headers;
* :mod:`~ram_trl.merging.chunks`: row chunks of every input as float32 deltas;
* :mod:`~ram_trl.merging.counting`: the counting pass (overlap histograms, per-agent statistics);
  :mod:`~ram_trl.merging.spill`: what it already merged, kept for the merge pass (one-pass RAM+);
* :mod:`~ram_trl.merging.engine`: :func:`merge` itself; :mod:`~ram_trl.merging.sinks` where it
  writes (shards, or ``ram_trl.lora.LoraSink`` for an adapter);
* :mod:`~ram_trl.merging.report`, :mod:`~ram_trl.merging.card`: ``ram_trl_merge.json`` and
  ``README.md``; :mod:`~ram_trl.merging.config`: :class:`MergeConfig`, a merge as a YAML recipe.

Builds on :mod:`ram_trl.io` and :mod:`ram_trl.methods`; reads snapshots through
:mod:`ram_trl.snapshot` and writes adapters through :mod:`ram_trl.lora`. Never imports the CLI or
the training code.
"""

from __future__ import annotations

from ram_trl.merging.config import MergeConfig
from ram_trl.merging.counting import agent_stats, count_overlaps
from ram_trl.merging.engine import OUTPUT_DTYPES, merge, parse_dtype
from ram_trl.merging.inputs import MergeInputs, open_inputs
from ram_trl.merging.report import AdapterReport, AgentStats, MergeReport

__all__ = [
    "OUTPUT_DTYPES",
    "AdapterReport",
    "AgentStats",
    "MergeConfig",
    "MergeInputs",
    "MergeReport",
    "agent_stats",
    "count_overlaps",
    "merge",
    "open_inputs",
    "parse_dtype",
]
