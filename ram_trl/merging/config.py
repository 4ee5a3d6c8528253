"""``MergeConfig``: one merge as a dataclass, loadable from a YAML recipe (``recipes/merge/``).

A recipe holds the same fields as the ``ram-trl merge`` flags::

    base: runs/synthetic/base
    agents: {code: runs/synthetic/agents/code, tool: runs/synthetic/agents/tool}
    method: ram_plus
    parameters: {r: 0.1, alpha: 2.0, epsilon: 1.0e-5}
    rho_scope: global
    out: runs/synthetic/merged
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.io.recipes import load_yaml
from ram_trl.validation import check_dataclass, check_fields, check_keys


@dataclass
class MergeConfig:
    base: str | None
    agents: dict[str, str] | list[str]
    out: str | None = None
    #: a snapshot store: ``agents`` then lists ``NAME`` or ``NAME@STEP`` (empty: every agent's
    #: newest snapshot) and ``base`` defaults to the one the store recorded
    store: str | None = None
    method: str = "ram_plus"
    parameters: dict[str, Any] = field(default_factory=dict)
    rho_scope: str | None = None
    dtype: str | None = None
    device: str = "cpu"
    shard_size: str | int = "5GB"
    overwrite: bool = False
    #: ``"model"`` or ``"lora"``: a PEFT adapter of rank ``lora_rank`` (or ``"auto"``: per
    #: module the smallest within ``lora_max_error``), biases and norms carried whole
    output: str = "model"
    lora_rank: int | str = 16
    lora_max_error: float | None = None

    def __post_init__(self) -> None:
        """Validate at construction, as TRL's configs do: a wrong type (``overwrite: "no"``
        would be truthy) or a bad method parameter fails here, naming the key, before any
        model is opened."""
        from ram_trl.methods import get_method

        check_dataclass(self)
        get_method(self.method).make_params(self.method_params())

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        return cls.from_dict(load_yaml(path, "recipe"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> MergeConfig:
        data = check_keys(cls, data, source)
        check_fields(cls, data, source)
        if data.get("store"):
            agents = data.get("agents") or []
            if not isinstance(agents, list):
                raise InputError(f"{source}: with 'store', 'agents' lists NAME or NAME@STEP")
            data = {"base": None, **data, "agents": [str(a) for a in agents]}
        else:
            for required in ("base", "agents"):
                if not data.get(required):
                    raise InputError(f"{source}: the field {required!r} is required")
            if not isinstance(data["agents"], dict):
                raise InputError(f"{source}: 'agents' must map agent names to model folders")
            data = {**data, "agents": {str(k): str(v) for k, v in data["agents"].items()}}
        try:
            return cls(**data)
        except InputError as e:  # a method parameter: say which recipe it is in
            raise InputError(f"{source}: {e}") from None

    def sources(self) -> tuple[Any, dict[str, Any]]:
        """The base and the agents to merge: model folders, or the store's snapshots."""
        if self.store is None:
            if self.base is None:
                raise InputError("no base model given (--base)")
            return self.base, dict(self.agents)
        from ram_trl.snapshot import SnapshotStore, open_store_agents

        store = SnapshotStore(self.store, create=False)
        base = self.base or store.base_path
        if base is None:
            raise InputError(f"store {self.store} records no base model; pass --base")
        return base, open_store_agents(store, list(self.agents), base)

    def method_params(self) -> dict[str, Any]:
        """The method's parameters, with ``rho_scope`` folded in where given."""
        params = dict(self.parameters or {})
        if self.rho_scope is not None:
            params["rho_scope"] = self.rho_scope
        return params

    def pinned(self) -> list[str]:
        """The store's snapshots this merge takes, as ``NAME@STEP`` (the newest now, for a bare
        ``NAME``): what every rank of a split merge opens, resolved once, on rank 0."""
        from ram_trl.snapshot import SnapshotStore
        from ram_trl.snapshot.store import resolve_store_agents

        resolved = resolve_store_agents(SnapshotStore(str(self.store), create=False), self.agents)
        return [f"{name}@{path.name.removeprefix('step-')}" for name, path in resolved.items()]

    def run(self, *, dry_run: bool = False, progress: bool = True, split: Any = None):
        """The merge; ``split`` (a :class:`~ram_trl.merging.split.Split`) on every rank of a
        ``torch.distributed`` job divides it between the ranks."""
        from ram_trl.merging.engine import merge
        from ram_trl.merging.split import Split

        split = split or Split()
        check_dataclass(self)  # fields may have been set since construction (the CLI does)
        config = self
        if split.active and self.store is not None:  # every rank merges the same snapshots
            config = dataclasses.replace(self, agents=split.on_main(self.pinned))
        with split.together():
            base, agents = config.sources()
        return merge(
            base,
            agents,
            self.method,
            self.out,
            params=self.method_params(),
            dtype=self.dtype,
            device=self.device,
            shard_size=self.shard_size,
            overwrite=self.overwrite,
            dry_run=dry_run,
            progress=progress,
            lora_rank=self._lora_rank(),
            lora_max_error=self.lora_max_error,
            split=split,
        )

    def _lora_rank(self) -> int | str | None:
        if self.output not in ("model", "lora"):
            raise InputError(f"output must be 'model' or 'lora', got {self.output!r}")
        if self.output == "model":
            return None
        rank = self.lora_rank
        rank = int(rank) if isinstance(rank, str) and rank.isdigit() else rank
        if rank != "auto" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise InputError(f"lora_rank must be an integer >= 1 or 'auto', got {rank!r}")
        return rank
