"""``ram-trl probe``: how sparse and how overlapping the agents' updates are (the paper's Fig. 2).

For each agent: the fraction of elements it changed, the share of its changed elements that
k = 0..N-1 other agents changed too, rho and the lambda the chosen method would give it, broken
down by module kind and by layer. One counting pass, the same one RAM+ uses to merge.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ram_trl.io import WeightSource, replace_file
from ram_trl.merging.chunks import resolve_device
from ram_trl.merging.counting import agent_stats, count_overlaps
from ram_trl.merging.inputs import open_inputs
from ram_trl.merging.report import AgentStats
from ram_trl.methods import CHANGE_EPSILON, get_method

KINDS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")
_LAYER = re.compile(r"\.(?:layers|layer|h|blocks|block)\.(\d+)\.")
_KIND_KEYS = (
    ("lm_head", ("lm_head",)),
    ("embeddings", ("embed", "wte", "wpe")),
    ("norms", ("norm", ".ln_", "ln_f")),
    ("attention", ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj")),
    ("mlp", ("mlp", "feed_forward", "ffn", "gate_proj", "up_proj", "down_proj", "experts")),
)


def module_kind(name: str) -> str:
    """Coarse module kind of a tensor name (norms inside attention blocks count as norms)."""
    lowered = name.lower()
    for kind, keys in _KIND_KEYS:
        if any(key in lowered for key in keys):
            return kind
    return "other"


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class Breakdown:
    """Per-group counts: elements, and per agent the changed count and overlap histogram."""

    elements: int = 0
    changed: list[int] = field(default_factory=list)
    overlap: list[list[int]] = field(default_factory=list)

    def add(self, hist: torch.Tensor, elements: int) -> None:
        if not self.changed:
            self.changed = [0] * hist.shape[0]
            self.overlap = [[0] * hist.shape[1] for _ in range(hist.shape[0])]
        self.elements += elements
        for t, row in enumerate(hist.tolist()):
            self.changed[t] += sum(row)
            self.overlap[t] = [a + b for a, b in zip(self.overlap[t], row, strict=True)]


@dataclass
class ProbeReport:
    base: str
    method: str
    params: dict[str, Any]
    agents: list[AgentStats]
    by_kind: dict[str, Breakdown]
    by_layer: dict[str, Breakdown]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["agents"] = [
            {**stats.to_dict(), "overlap_share": _shares(stats.overlap)} for stats in self.agents
        ]
        return data

    def save_json(self, path: str | Path) -> None:
        replace_file(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def table(self) -> str:
        return format_table(self)


def probe(
    base: str | os.PathLike | WeightSource,
    agents: Mapping[str, str | os.PathLike | WeightSource],
    method: str = "ram_plus",
    *,
    params: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProbeReport:
    """Count changed, unique and shared elements of every agent, as RAM sees them."""
    spec = get_method(method)
    params_obj = spec.make_params(params)
    epsilon = spec.change_epsilon(params_obj)
    with open_inputs(base, agents) as inputs:
        counts = count_overlaps(
            inputs,
            CHANGE_EPSILON if epsilon is None else epsilon,
            device=resolve_device(device),
            progress=progress,
            desc="probing",
        )
        by_kind: dict[str, Breakdown] = {}
        by_layer: dict[str, Breakdown] = {}
        for name, hist in counts.tensors.items():
            elements = inputs.base.tensors[name].numel
            by_kind.setdefault(module_kind(name), Breakdown()).add(hist, elements)
            layer = layer_index(name)
            by_layer.setdefault("-" if layer is None else str(layer), Breakdown()).add(
                hist, elements
            )
        return ProbeReport(
            base=str(inputs.base.path),
            method=spec.name,
            params=dataclasses.asdict(params_obj),
            agents=agent_stats(inputs, counts, spec.prepare_model(params_obj, counts)),
            by_kind={k: by_kind[k] for k in KINDS if k in by_kind},
            by_layer=dict(sorted(by_layer.items(), key=lambda kv: _layer_key(kv[0]))),
        )


def _layer_key(layer: str) -> tuple[int, int]:
    return (1, 0) if layer == "-" else (0, int(layer))


def _shares(overlap: list[int]) -> list[float]:
    total = sum(overlap)
    return [x / total if total else 0.0 for x in overlap]


def format_table(report: ProbeReport) -> str:
    n = len(report.agents)
    head = ["agent", "changed", *[f"overlap {k}" for k in range(n)], "rho", "lambda"]
    rows = [
        [
            a.name,
            f"{100 * a.changed_fraction:.2f}%",
            *[f"{100 * s:.1f}%" for s in _shares(a.overlap)],
            "-" if a.rho is None else f"{a.rho:.3g}",
            f"{a.lambda_:.4f}",
        ]
        for a in report.agents
    ]
    lines = [f"Probe of {n} agent(s) against {report.base} ({report.method})", _render(head, rows)]
    for title, groups in (("module kind", report.by_kind), ("layer", report.by_layer)):
        head = [title, "elements", *[f"{a.name} changed" for a in report.agents]]
        rows = [
            [key, f"{g.elements:,}", *[f"{100 * c / max(1, g.elements):.2f}%" for c in g.changed]]
            for key, g in groups.items()
        ]
        lines += ["", _render(head, rows)]
    lines.append(
        "\noverlap k = share of an agent's changed elements that k other agents changed too"
    )
    return "\n".join(lines)


def _render(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def save_plot(report: ProbeReport, path: str | Path) -> bool:
    """A PNG like the paper's Fig. 2 (overlap shares per agent) plus changed fraction by layer.
    Returns False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    n = len(report.agents)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * n + 3))
    names = [a.name for a in report.agents]
    starts = [0.0] * n
    for k in range(n):
        shares = [100 * _shares(a.overlap)[k] if a.overlap else 0.0 for a in report.agents]
        left.barh(names, shares, left=starts, label=f"{k} other(s)")
        starts = [s + v for s, v in zip(starts, shares, strict=True)]
    left.set_xlabel("% of the agent's changed elements")
    left.set_title("overlap with other agents")
    left.legend(fontsize=8)
    layers = [key for key in report.by_layer if key != "-"]
    for t, name in enumerate(names):
        values = [
            100 * report.by_layer[key].changed[t] / max(1, report.by_layer[key].elements)
            for key in layers
        ]
        right.plot([int(x) for x in layers], values, marker="o", label=name)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("layer")
    right.set_ylabel("% of elements changed")
    right.set_title("changed fraction by layer")
    right.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    replace_file(Path(path), buffer.getvalue())  # a reader never sees half a PNG
    return True
