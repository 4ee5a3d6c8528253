"""The model card (README.md) written next to every merged model: what was merged, how, and how to
do it again. Its Hub metadata is ``huggingface_hub``'s ``ModelCardData`` (the ``ModelCard`` class
would only parse the same text back, for 0.15 s of imports in every merge).

Reads only a :class:`~ram_trl.merging.report.MergeReport`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from huggingface_hub import ModelCardData

from ram_trl.merging.report import AgentStats, MergeReport

_PAPER = "https://arxiv.org/abs/2601.13572"
#: a Hub cache snapshot: .../models--<org>--<name>/snapshots/<revision>
_HUB_CACHE = re.compile(r"models--(?P<repo>[^/]+)/snapshots/[^/]+/?$")


def hub_repo_id(path: str) -> str | None:
    """The Hub id (``org/name``) of a model read from the Hugging Face cache, else None: a local
    folder is no ``base_model`` the Hub could link to."""
    match = _HUB_CACHE.search(Path(path).as_posix())
    return match["repo"].replace("--", "/") if match else None


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
    repo = hub_repo_id(report.base)
    hub = {"base_model": repo, "base_model_relation": "adapter" if report.lora else "merge"}
    data = ModelCardData(
        library_name="peft" if report.lora else "transformers",
        tags=["merge", "ram-trl", report.method],
        **(hub if repo else {}),
    )
    params = ", ".join(f"{k}={v}" for k, v in report.params.items()) or "none"
    what = f"a LoRA adapter of rank {report.lora.rank}" if report.lora else "a merged model"
    body = f"""
# Merged model ({report.method})

This is {what}, made with ram-trl {report.ram_trl_version} from the base
`{report.base}` and {len(report.agents)} agent(s), with the method **{report.method}**
({params}). RAM and RAM+ come from *Reinforced Agent Merging* ([Yuan et al.]({_PAPER})): elements
no agent changed stay at the base, elements one agent changed keep that agent's delta (scaled by
lambda_t in RAM+), and elements several agents changed get the mean of their deltas.

{_agent_table(report)}
{_adapter_note(report)}
## Reproduce

```bash
{reproduce_command(report)}
```

The machine-readable record of this merge is `ram_trl_merge.json`.
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _agent_table(report: MergeReport) -> str:
    if not report.counted:
        rows = "\n".join(f"| {a.name} | `{a.path}` |" for a in report.agents)
        return (
            f"| agent | path |\n|---|---|\n{rows}\n\nThis method does not count changed "
            "elements, so none are shown; `ram-trl probe` reports them.\n"
        )
    per_tensor = any(a.lambda_range is not None for a in report.agents)
    head = "| agent | path | changed | unique | shared | rho | lambda |"
    if per_tensor:
        head += " rho per tensor | lambda per tensor |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    lines += [_agent_row(a, per_tensor) for a in report.agents]
    table = "\n".join(lines) + "\n"
    if per_tensor:
        table += (
            "\nrho and lambda were counted per tensor (`rho_scope=tensor`, mergekit's "
            "`ramplus_tl`): the lambda applied to an agent's unique elements differs by tensor, "
            "and the per-tensor columns give its range over the tensors where the agent has "
            "unique elements. The rho and lambda columns are the whole-model values, shown for "
            "comparison.\n"
        )
    elif "rho_scope" in report.params:
        table += "\nrho and lambda were counted over the whole model (`rho_scope=global`).\n"
    return table


def _agent_row(a: AgentStats, per_tensor: bool) -> str:
    row = (
        f"| {a.name} | `{a.path}` | {_pct(a.changed, a.total)} | {_pct(a.unique, a.changed)} | "
        f"{_pct(a.shared, a.changed)} | {_num(a.rho)} | {a.lambda_:.4f} |"
    )
    if per_tensor:
        row += f" {_span(a.rho_range, '.4g')} | {_span(a.lambda_range, '.4f')} |"
    return row


def _adapter_note(report: MergeReport) -> str:
    if report.lora is None:
        return ""
    lora = report.lora
    exact = (
        f" {len(lora.exact)} tensor(s) LoRA cannot express (biases, norms) are carried whole, "
        'as PEFT\'s `bias="all"` and `modules_to_save`.'
        if lora.exact
        else ""
    )
    dropped = (
        f" **Not carried** (the adapter differs from the merge there): {', '.join(lora.dropped)}."
        if lora.dropped
        else ""
    )
    return (
        f"\nThe merged delta was re-factorized into this adapter by truncated SVD: relative "
        f"reconstruction error {lora.error:.4g} overall, {lora.max_error:.4g} at "
        f"worst (`ram_trl_lora.json` has it per module).{exact}{dropped} Load it over the base "
        "with `PeftModel.from_pretrained`.\n"
    )


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _span(bounds: tuple[float, float] | None, fmt: str) -> str:
    return "-" if bounds is None else f"{bounds[0]:{fmt}} to {bounds[1]:{fmt}}"
