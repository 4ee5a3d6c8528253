"""The demo's results: the Table-1-style table, ``results.json`` and the bar chart."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.io import replace_file

SCHEMA = "ram-trl-demo/1"


@dataclass
class Row:
    """One model of the table: its test reward per task, and for merges the chosen setting and
    the retention of every specialist's skill (merged / specialist score on its own task)."""

    name: str
    kind: str  # base | specialist | joint | merge
    scores: dict[str, float]
    setting: str = ""
    retention: dict[str, float] = field(default_factory=dict)
    validation: float | None = None  # the mean validation reward that chose the setting

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


@dataclass
class Results:
    tasks: list[str]
    rows: list[Row]
    agents: dict[str, dict[str, float]]  # name -> density, unique_share, shared_share
    during_training: list[dict[str, Any]]  # the callback's in-training merges and their rewards
    config: dict[str, Any]
    seconds: dict[str, float]

    def add_retention(self) -> None:
        specialists = {r.name: r for r in self.rows if r.kind == "specialist"}
        for row in self.rows:
            if row.kind == "merge":
                row.retention = {
                    t: _ratio(row.scores[t], specialists[t].scores[t])
                    for t in self.tasks
                    if t in specialists
                }

    def to_json(self) -> dict[str, Any]:
        rows = [{**asdict(r), "average": r.average} for r in self.rows]
        return {
            "schema": SCHEMA,
            **{k: v for k, v in asdict(self).items() if k != "rows"},
            "rows": rows,
        }

    def save(self, folder: Path) -> None:
        replace_file(folder / "results.json", json.dumps(self.to_json(), indent=1).encode())
        self.plot(folder / "results.png")

    def table(self) -> str:
        """The printed table: one row per model, a column per task, the average, and each
        merge's mean retention (lowest task in brackets)."""
        head = ["model", "setting", *self.tasks, "avg", "retention (min)"]
        lines = []
        for r in self.rows:
            kept = ""
            if r.retention:
                values = list(r.retention.values())
                kept = f"{sum(values) / len(values):.2f} ({min(values):.2f})"
            cells = [f"{r.scores[t]:.3f}" for t in self.tasks]
            lines.append([r.name, r.setting, *cells, f"{r.average:.3f}", kept])
        widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
        fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        body = [fmt.format(*head), rule]
        kinds = [r.kind for r in self.rows]
        for i, line in enumerate(lines):
            if i and kinds[i] != kinds[i - 1]:
                body.append(rule)
            body.append(fmt.format(*line))
        return "\n".join(body)

    def plot(self, path: Path) -> bool:
        """Grouped bars: every model's test reward per task and on average."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        columns = [*self.tasks, "avg"]
        width = 0.8 / len(self.rows)
        fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(columns), 4.2))
        colours = plt.get_cmap("tab20")
        hatches = {"base": "", "specialist": "//", "joint": "xx", "merge": ""}
        for i, row in enumerate(self.rows):
            values = [row.scores[t] for t in self.tasks] + [row.average]
            xs = [c + (i - (len(self.rows) - 1) / 2) * width for c in range(len(columns))]
            ax.bar(xs, values, width, label=row.name, color=colours(i % 20),
                   hatch=hatches.get(row.kind, ""), edgecolor="white", linewidth=0.3)  # fmt: skip
        ax.set_xticks(range(len(columns)), columns)
        ax.set_ylabel("test reward (greedy)")
        ax.set_title("ram-trl demo: specialists, joint RL and merges")
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=110, format="png")
        replace_file(path, buffer.getvalue())
        plt.close(fig)
        return True


def _ratio(value: float, reference: float) -> float:
    return value / reference if reference > 0 else math.nan
