"""A merge service beside the training jobs: ``ram-trl watch STORE`` merges whenever new snapshots
land, so that the jobs (``RAMConfig(merge="watcher")``) only snapshot and never pause to merge.

It polls the store (every agent's newest valid snapshot, cheap: a manifest read each), and when
that state has changed runs :func:`~ram_trl.training.jobs.merge_store`, which reuses an entry
any job made already. Optionally it scores each new merged model on eval tasks (a YAML file with
``eval_tasks`` and ``eval_*`` generation fields, as in a :class:`RAMConfig`), writing the scores
to ``<store>/eval/<entry>.json`` and printing them. Several watchers of one store are safe
(the claims make one merge per state), though one is enough.

A watcher holds an flock on ``<store>/.watcher-<pid>.lock`` while it runs (the kernel drops it
when the process dies, however it dies): :func:`watcher_running` is how a job with
``merge="watcher"`` knows, at train end, whether waiting for a merge of its final snapshot makes
sense.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.evaluation import EvalTask, GenerationSettings, TrainerContext
from ram_trl.io import replace_file
from ram_trl.io.atomic import hold_lock_file, lock_is_held
from ram_trl.io.recipes import load_yaml
from ram_trl.training.jobs import MergeOutcome, MergeSettings, merge_store


@dataclasses.dataclass(frozen=True)
class EvalRecipe:
    """Eval tasks and generation settings for merged models outside training."""

    tasks: list[EvalTask]
    generation: GenerationSettings
    base: bool = False

    @classmethod
    def from_yaml(cls, path: str | Path) -> EvalRecipe:
        data = load_yaml(path, "eval recipe")
        if not isinstance(data, dict) or "eval_tasks" not in data:
            raise InputError(f"eval recipe {path}: expected a mapping with 'eval_tasks'")
        known = {f"eval_{f.name}" for f in dataclasses.fields(GenerationSettings)}
        unknown = sorted(set(data) - known - {"eval_tasks", "eval_base"})
        if unknown:
            raise InputError(
                f"eval recipe {path}: unknown field(s) {unknown}; known: {sorted(known)}"
            )
        tasks = data["eval_tasks"]
        if not isinstance(tasks, list):
            raise InputError(f"eval recipe {path}: eval_tasks must be a list of tasks")
        try:
            built = [EvalTask(**t) for t in tasks]
        except TypeError as e:
            raise InputError(f"eval recipe {path}: {e}") from None
        generation = {k.removeprefix("eval_"): v for k, v in data.items() if k in known}
        return cls(built, GenerationSettings(**generation), bool(data.get("eval_base", False)))


def store_base(store: Any) -> Path:
    """theta_0 of a store: its ``base/`` folder, else the base it recorded."""
    for candidate in (store.root / "base", store.base_path):
        if candidate is not None and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    raise InputError(f"store {store.root} has no base model yet (no base/ and none recorded)")


def watcher_running(store: Any) -> bool:
    """Whether a live ``ram-trl watch`` process watches ``store`` (it holds a watcher lock)."""
    return any(lock_is_held(p) for p in Path(store.root).glob(".watcher-*.lock"))


@contextlib.contextmanager
def _watching(store: Any) -> Iterator[None]:
    """Hold this process's watcher lock (see the module docstring); remove it at the end."""
    path = Path(store.root) / f".watcher-{os.getpid()}.lock"
    fd = hold_lock_file(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _state(store: Any) -> dict[str, Any]:
    from ram_trl.snapshot.merged import describe_inputs

    refs = {a: r for a in store.agents() if (r := store.latest(a)) is not None}
    return describe_inputs(refs)


def watch(
    store: Any,
    settings: MergeSettings,
    *,
    recipe: EvalRecipe | None = None,
    interval: float = 5.0,
    idle_exit: float | None = None,
    max_merges: int | None = None,
    keep_last_merged: int | None = None,
    device: str = "cpu",
    report: Callable[[dict[str, Any]], None] = lambda line: print(json.dumps(line), flush=True),
) -> list[MergeOutcome]:
    """Merge ``store`` whenever its newest snapshots change, until ``idle_exit`` seconds pass
    without a change, ``max_merges`` merges were made or found, or KeyboardInterrupt. Each new
    entry is passed to ``report`` as a dict (name, inputs, whether it was made here, seconds,
    and scores with a ``recipe``). Returns the outcomes."""
    outcomes: list[MergeOutcome] = []
    seen: dict[str, Any] | None = None
    changed = time.monotonic()
    scorer = None
    try:
        with _watching(store):  # a job at train end sees that a watcher runs
            while max_merges is None or len(outcomes) < max_merges:
                try:
                    state = _state(store)
                except InputError as error:  # a snapshot removed while it was read: look again
                    report({"error": str(error)})
                    time.sleep(interval)
                    continue
                if state != seen:
                    seen, changed = state, time.monotonic()
                    if len(state) < settings.min_agents:
                        continue
                    outcome = merge_store(
                        store, store_base(store), settings, keep_last_merged=keep_last_merged
                    )
                    if outcome is not None and all(o.entry != outcome.entry for o in outcomes):
                        outcomes.append(outcome)
                        entry = outcome.entry
                        line = {
                            "entry": entry.name,
                            "inputs": entry.steps,
                            "made": outcome.made,
                            "seconds": round(outcome.seconds, 3),
                        }
                        if recipe is not None:
                            scorer = scorer or _scorer(store, recipe)
                            line["scores"] = _score(store, scorer, recipe, outcome, device)
                        report(line)
                    continue  # look again at once: snapshots may have landed while it merged
                if idle_exit is not None and time.monotonic() - changed > idle_exit:
                    break
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return outcomes


def _scorer(store: Any, recipe: EvalRecipe) -> Any:
    from transformers import AutoTokenizer

    from ram_trl.training.scoring import Scorer

    tokenizer = AutoTokenizer.from_pretrained(store_base(store))
    return Scorer(
        recipe.tasks,
        recipe.generation,
        TrainerContext(),
        tokenizer=tokenizer,
        cache=store.root / "eval",
    )


def _score(store: Any, scorer: Any, recipe: EvalRecipe, outcome: MergeOutcome, device: str) -> dict:
    import torch

    entry, base, where = outcome.entry, store_base(store), torch.device(device)
    scores = scorer.merged(entry.path, base, where, lora=entry.is_adapter)
    if recipe.base:
        scores.update(scorer.base(base, where))
    path = store.root / "eval" / f"{entry.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, json.dumps(scores, indent=1).encode())
    return scores
