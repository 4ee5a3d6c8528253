"""What the demo runs: one dataclass, a YAML recipe of its fields, and a ``quick`` preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.io.recipes import load_yaml
from ram_trl.validation import check_dataclass, check_keys

#: the order in which ``--agents N`` takes tasks
TASK_ORDER = ("tool", "arith", "memory", "code")


@dataclass
class DemoConfig:
    """Every setting of ``ram-trl demo``; the defaults are the frozen default run.

    The model, SFT and GRPO settings were chosen once, by the measurements in ``docs/demo.md``,
    for agents that learn their task within the CPU budget; they were not tuned to make any merge
    method win. Baselines are tuned on the validation split over the ``*_grid`` values (reduced
    from the paper's Table 11) and reported on the test split, like ``ram_plus (r tuned)`` over
    ``r_grid`` (the paper's Table 2).
    """

    out: str = "runs/demo"
    agents: int = 3
    seed: int = 0
    device: str = "cpu"
    model: str | None = None  # a local HF causal-LM folder instead of the built base (no SFT)
    quick: bool = False
    # -- the built base and its SFT warm-up ------------------------------------------------
    hidden_size: int = 128
    layers: int = 2
    sft_steps: int = 300
    sft_lr: float = 3e-3
    sft_batch_size: int = 96
    # -- data --------------------------------------------------------------------------------
    test_prompts: int = 60
    val_prompts: int = 40
    train_prompts: int = 2000
    # -- GRPO, per agent ---------------------------------------------------------------------
    grpo_steps: int = 600
    save_steps: int = 100
    learning_rate: float = 3e-6
    optim: str = "adamw_torch"
    adam_epsilon: float = 1e-8
    beta: float = 0.0
    num_generations: int = 8
    prompts_per_step: int = 4
    temperature: float = 1.0
    concurrency: int = 2
    merged_eval_prompts: int = 8  # validation prompts per task for the in-training merged eval
    # -- final merges ------------------------------------------------------------------------
    scale_grid: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    keep_grid: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3])
    drop_grid: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    r_grid: list[float] = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.15, 0.2])

    def __post_init__(self) -> None:
        check_dataclass(self, "demo setting")
        if not isinstance(self.agents, int) or not 2 <= self.agents <= len(TASK_ORDER):
            raise InputError(
                f"agents must be an integer in 2..{len(TASK_ORDER)}, got {self.agents}"
            )
        if self.device not in ("cpu", "cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.model is not None and not (Path(self.model) / "config.json").is_file():
            raise InputError(
                f"--model {self.model}: not a Hugging Face model folder (no config.json)"
            )
        for name in ("grpo_steps", "save_steps", "concurrency", "test_prompts", "val_prompts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")

    @property
    def tasks(self) -> list[str]:
        return list(TASK_ORDER[: self.agents])

    @classmethod
    def preset(cls, quick: bool, **overrides: Any) -> DemoConfig:
        """The default run, or with ``quick`` the smoke-test run (a smaller base, fewer steps and
        prompts, smaller grids: the same pipeline in under two minutes)."""
        values: dict[str, Any] = {}
        if quick:
            values = dict(
                quick=True,
                hidden_size=64,
                sft_steps=120,
                test_prompts=12,
                val_prompts=8,
                train_prompts=48,
                grpo_steps=12,
                save_steps=6,
                merged_eval_prompts=4,
                scale_grid=[0.5, 1.0],
                keep_grid=[0.2],
                drop_grid=[0.5],
                r_grid=[0.0, 0.1],
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> DemoConfig:
        data = check_keys(cls, load_yaml(path, "demo recipe"), f"demo recipe {path}")
        if not isinstance(data.get("quick", False), bool):
            raise InputError(f"demo recipe {path}: quick must be true or false")
        return cls.preset(
            data.pop("quick", False) or bool(overrides.pop("quick", False)),
            **{**data, **{k: v for k, v in overrides.items() if v is not None}},
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
