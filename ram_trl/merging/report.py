"""What a merge did, as dataclasses that survive JSON: ``ram_trl_merge.json`` next to every
merged model, and the report a background merge hands back to the training job.

Imports nothing of ram-trl: the engine fills these in, the model card, the CLI, the probe and
the training jobs read them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AgentStats:
    """One agent's change statistics and the scale RAM-family methods give its unique deltas.

    ``lambda_`` is the whole-model value (``rho_scope="global"``, the paper). With per-tensor
    scales (``rho_scope="tensor"``) the values applied differ by tensor: ``lambda_range`` and
    ``rho_range`` are their (min, max) over the tensors where the agent has unique elements, and
    ``lambda_`` is what the whole model's counts would give.
    """

    name: str
    path: str
    changed: int
    unique: int
    shared: int
    overlap: list[int]  # overlap[k]: changed elements that exactly k other agents changed too
    rho: float | None  # None when undefined (no unique elements)
    lambda_: float
    total: int = 0  # elements of the floating-point tensors the agent could change
    rho_range: tuple[float, float] | None = None
    lambda_range: tuple[float, float] | None = None

    @property
    def changed_fraction(self) -> float:
        return self.changed / max(1, self.total)

    @property
    def lam(self) -> float:
        """``lambda_`` under its earlier name."""
        return self.lambda_

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lambda"] = data.pop("lambda_")
        data["changed_fraction"] = self.changed_fraction
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentStats:
        data = {**data, "lambda_": data.get("lambda", data.get("lambda_"))}
        for key in ("rho_range", "lambda_range"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


@dataclass
class AdapterReport:
    """How well a LoRA output expresses the merged delta (truncated SVD, rank ``rank``):
    relative Frobenius errors overall and at worst, and the deltas LoRA could not express."""

    rank: int | str
    error: float
    max_error: float
    dropped: dict[str, Any] = field(default_factory=dict)
    exact: list[str] = field(default_factory=list)  # carried whole: biases, norms
    error_limit: float | None = None

    @classmethod
    def of(cls, adapter: dict[str, Any]) -> AdapterReport:
        """The summary of ``save_lora_adapter``'s report."""
        return cls(
            adapter["rank"],
            adapter["error"],
            adapter["max_error"],
            adapter["dropped"],
            adapter.get("exact", []),
            adapter.get("error_limit"),
        )


@dataclass
class MergeReport:
    """What a merge did: inputs, method, parameters, per-agent statistics, output, timings.

    ``counted`` says whether the agents' changes were counted (RAM+ and every dry run count them;
    methods that need no counts skip that pass, and their agents' counts are zeros).
    ``lora`` is set when the output is a LoRA adapter.
    """

    method: str
    params: dict[str, Any]
    base: str
    agents: list[AgentStats]
    total_elements: int
    out: str | None = None
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    ram_trl_version: str = ""
    counted: bool = True
    lora: AdapterReport | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["agents"] = [agent.to_dict() for agent in self.agents]
        if self.lora is None:
            del data["lora"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MergeReport:
        """The inverse of :meth:`to_dict` (e.g. of a ``ram_trl_merge.json``)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["agents"] = [AgentStats.from_dict(a) for a in data.get("agents", [])]
        if data.get("lora") is not None:
            values["lora"] = AdapterReport(**data["lora"])
        return cls(**values)
