"""Choosing a merge method and its parameters on validation tasks: :func:`search`.

Merge methods have knobs (TIES' ``keep``, DARE's ``drop``, task arithmetic's ``scale``, RAM+'s
``r``), and papers tune them per benchmark: the RAM paper tunes every baseline over its
Table 11 grid. ``search`` does that for a user's own agents: it merges each candidate, scores the
merged model on held-out prompts of every task with the agents' own reward functions, and
returns the candidates ranked. Score on a validation split and report the winner on a separate
test split, or the choice is fitted to the numbers it reports.

Each candidate is merged into a temporary folder that is removed once it is scored, so disk use
stays that of one merged model; with ``out`` the best one is kept.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ram_trl.errors import InputError
from ram_trl.evaluation import EvalTask, GenerationSettings, score_folder

__all__ = ["Candidate", "SearchResult", "grid", "search"]


@dataclass(frozen=True)
class Candidate:
    """One merge to try: a method and its parameters, with a label for tables."""

    method: str
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        args = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.method}({args})" if args else self.method


@dataclass
class SearchResult:
    """A candidate's scores: ``scores[task]`` is its mean reward on that task, ``score`` the
    mean over tasks; ``path`` the kept model folder (only the best, and only with ``out``)."""

    candidate: Candidate
    scores: dict[str, float]
    score: float
    path: str | None = None


def grid(method: str, label: str | None = None, **axes: Sequence[Any]) -> list[Candidate]:
    """Every combination of ``axes`` for ``method``: ``grid("ties", keep=[.1, .2], scale=[1])``."""
    combos: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return [Candidate(method, c, label) for c in combos]


def search(
    base: str | os.PathLike,
    agents: Mapping[str, Any],
    candidates: Iterable[Candidate],
    eval_tasks: Sequence[EvalTask],
    *,
    tokenizer: Any | None = None,
    generation: GenerationSettings | None = None,
    device: str = "cpu",
    out: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[SearchResult]:
    """Merge ``agents`` of ``base`` with every candidate, score each on ``eval_tasks``, and
    return the results best first (ties keep the candidates' order, so list the default first).

    ``agents`` are what :func:`ram_trl.merge` takes (model folders or weight sources, e.g.
    store snapshots). The tokenizer defaults to ``base``'s. With ``out``, the best candidate's
    merged model is moved there (it must not exist yet) and its ``path`` set.
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ram_trl.merging.engine import merge

    candidates = list(candidates)
    if not candidates:
        raise InputError("search needs at least one candidate")
    if not eval_tasks:
        raise InputError("search needs at least one eval task")
    if out is not None and Path(out).exists():
        raise InputError(f"search output {out} already exists")
    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
    results: list[SearchResult] = []
    best: tuple[float, Path] | None = None
    scratch = Path(tempfile.mkdtemp(prefix="ram-trl-search-", dir=_scratch_parent(out)))
    try:
        for i, candidate in enumerate(tqdm(candidates, desc="search", disable=not progress)):
            folder = scratch / f"candidate-{i}"
            merge(base, agents, candidate.method, folder, params=dict(candidate.params),
                  device=device, progress=False)  # fmt: skip
            scores = score_folder(
                folder, eval_tasks, generation, device=device, tokenizer=tokenizer
            )
            score = math.fsum(scores.values()) / len(scores)
            results.append(SearchResult(candidate, scores, score))
            if out is not None and (best is None or _finite(score) > best[0]):
                if best is not None:
                    shutil.rmtree(best[1])
                best = (_finite(score), folder)
            else:
                shutil.rmtree(folder)
        ranked = sorted(results, key=lambda r: -_finite(r.score))
        if out is not None and best is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            os.replace(best[1], out)
            ranked[0].path = str(out)
        return ranked
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finite(score: float) -> float:
    return score if math.isfinite(score) else -math.inf


def _scratch_parent(out: str | os.PathLike | None) -> str | None:
    """Merge next to ``out`` (same filesystem, so keeping the best is a rename)."""
    if out is None:
        return None
    parent = Path(out).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent)
