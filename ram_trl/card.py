"""The model card (README.md) written next to every merged model: what was merged, how, and how to
do it again."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ram_trl.engine import MergeReport

_PAPER = "https://arxiv.org/abs/2601.13572"


def reproduce_command(report: MergeReport) -> str:
    """A ``ram-trl merge`` command line that redoes this merge."""
    words = ["ram-trl", "merge", "--base", report.base]
    stores = {_store_of(Path(agent.path)) for agent in report.agents}
    if len(stores) == 1 and None not in stores:  # snapshots of one store, by agent and step
        words += ["--store", str(stores.pop())]
        for agent in report.agents:
            words += ["--agent", f"{agent.name}@{Path(agent.path).name.removeprefix('step-')}"]
    else:
        for agent in report.agents:
            words += ["--agent", f"{agent.name}={agent.path}"]
    words += ["--method", report.method]
    for key, value in report.params.items():
        words += [f"--{key.replace('_', '-')}", str(value)]
    if report.out:
        words += ["--out", report.out]
    return shlex.join(words)


def _store_of(snapshot: Path) -> Path | None:
    """The store holding a snapshot folder ``<store>/agents/<agent>/step-<N>``, if it is one."""
    in_store = snapshot.name.startswith("step-") and snapshot.parent.parent.name == "agents"
    return snapshot.parents[2] if in_store and (snapshot / "manifest.json").is_file() else None


def render_model_card(report: MergeReport) -> str:
    params = ", ".join(f"{k}={v}" for k, v in report.params.items()) or "none"
    rows = "\n".join(
        f"| {a.name} | `{a.path}` | {_pct(a.changed, a.total)} | {_pct(a.unique, a.changed)} | "
        f"{_pct(a.shared, a.changed)} | {_num(a.rho)} | {a.lam:.4f} |"
        for a in report.agents
    )
    counted = any(a.changed for a in report.agents)
    note = (
        ""
        if counted
        else "\nThis method does not count changed elements; `ram-trl probe` reports them.\n"
    )
    return f"""---
library_name: transformers
tags:
- merge
- ram-trl
- {report.method}
base_model: {report.base}
---

# Merged model ({report.method})

Merged with ram-trl {report.ram_trl_version} from the base
`{report.base}` and {len(report.agents)} agent(s), with the method **{report.method}**
({params}). RAM and RAM+ come from *Reinforced Agent Merging* ([Yuan et al.]({_PAPER})): elements
no agent changed stay at the base, elements one agent changed keep that agent's delta (scaled by
lambda_t in RAM+), and elements several agents changed get the mean of their deltas.

| agent | path | changed | unique | shared | rho | lambda |
|---|---|---|---|---|---|---|
{rows}
{note}
## Reproduce

```bash
{reproduce_command(report)}
```

The machine-readable record of this merge is `ram_trl_merge.json`.
"""


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
