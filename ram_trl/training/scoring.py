"""Evaluation inside training: the store's merged models, the live agent and the base, scored on
the run's eval tasks with the trainer's generation settings and reward weights.

The base never changes, so its scores are computed once per store and settings and cached in
``<store>/eval/base-<key>.json`` (written atomically; any job sharing the store reuses them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.evaluation import (
    EvalTask,
    GenerationSettings,
    TrainerContext,
    check_task,
    evaluate,
    func_name,
    load_model,
)
from ram_trl.io import replace_file


class Scorer:
    """Scores models on ``tasks`` with ``generation``; one per :class:`AgentRun`.

    Construction calls every reward function once (:func:`~ram_trl.evaluation.check_task`), so a
    broken one is an InputError before training starts, not a crash at the first evaluation.
    """

    def __init__(
        self,
        tasks: list[EvalTask],
        generation: GenerationSettings,
        context: TrainerContext,
        *,
        tokenizer: Any,
        cache: Path,
    ) -> None:
        self.context = context  # shared with the run: the callback updates its state
        self.tasks = [self.context.task(t) for t in tasks]
        self.generation, self.cache = generation, cache
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps one
        for task in self.tasks:
            check_task(task, self.context.state)
        self.last_table: list[dict[str, Any]] = []

    def score(self, prefix: str, model: nn.Module, table: bool = False) -> dict[str, float]:
        """``{<prefix>/<task>/<key>: value}`` for every task (see :func:`evaluate`)."""
        out: dict[str, float] = {}
        rows: list[dict[str, Any]] | None = [] if table else None
        for task in self.tasks:
            task_rows: list[dict[str, Any]] = []
            result = evaluate(
                model,
                self.tokenizer,
                task,
                self.generation,
                trainer_state=self.context.state,
                completions_table=task_rows,
            )
            out.update({f"{prefix}/{task.name}/{key}": value for key, value in result.items()})
            if rows is not None:
                rows.extend({"task": task.name, **row} for row in task_rows)
        if rows is not None:
            self.last_table = rows
        return out

    def merged(
        self, path: Path, base: Path, device: torch.device, *, lora: bool
    ) -> dict[str, float]:
        model = load_model(path, base, device, lora=lora)
        try:
            return self.score("eval_merged", model, table=True)
        finally:
            del model

    def base(self, base: Path, device: torch.device) -> dict[str, float]:
        """The base's scores, from the store's cache when any job computed them already."""
        path = self.cache / f"base-{self._key()}.json"
        try:
            return {k: float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            pass
        logs = self.score("eval_base", load_model(base, base, device, lora=False))
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, json.dumps(logs, indent=1).encode())
        return logs

    def _key(self) -> str:
        """Which scores a cached file holds: tasks (prompts, functions, weights, columns) and
        the generation settings."""
        tasks = [
            [
                t.name,
                repr(t.prompts),
                [func_name(f) for f in t.reward_funcs],
                t.reward_weights,
                repr(sorted(t.columns.items())),
            ]
            for t in self.tasks
        ]
        text = json.dumps([tasks, dataclasses.asdict(self.generation)], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def timed(logs: Callable[[], dict[str, float]]) -> dict[str, float]:
    """``logs()`` plus ``ram/eval_seconds``."""
    started = time.perf_counter()
    out = logs()
    if out:
        out["ram/eval_seconds"] = time.perf_counter() - started
    return out
