"""ram_trl.search: merges every candidate, scores it on the tasks, ranks, keeps the best."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ram_trl import Candidate, EvalTask, GenerationSettings, InputError, evaluate, search
from ram_trl.merging.search import grid

PROMPTS = ["1+1=", "abc", "k1=a k1?", "rev ab:", "weather in oslo?", "7+2="]


@pytest.fixture(scope="module")
def case(tiny_base_factory, tmp_path_factory):
    """Agents whose deltas are large enough to change greedy outputs, and a task rewarding a
    completion equal to the base's own: the known best merge is ``scale=0`` (the base itself)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_base_factory()
    from ram_trl.testing import make_sparse_agents

    agents = make_sparse_agents(
        base, tmp_path_factory.mktemp("agents"), ["a", "b"], density=0.5, overlap=0.5, scale=3.0
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    settings = GenerationSettings(max_new_tokens=6)

    reference: list[str] = []

    def record(prompts, completions, **kwargs):
        reference[:] = completions
        return [0.0] * len(completions)

    evaluate(model, tokenizer, EvalTask("record", PROMPTS, record), settings)
    tasks = [
        EvalTask("first", PROMPTS[:3], _same_as(reference[:3])),
        EvalTask("second", PROMPTS[3:], _same_as(reference[3:])),
    ]
    return base, agents, tasks, settings


def _same_as(expected):
    def same_as_base(prompts, completions, **kwargs):
        return [float(c == e) for c, e in zip(completions, expected, strict=True)]

    return same_as_base


def test_search_ranks_the_known_best_first_and_keeps_it(case, tmp_path):
    base, agents, tasks, settings = case
    tried = [
        Candidate("task_arithmetic", {"scale": 1.0}),
        Candidate("task_arithmetic", {"scale": 0.0}),  # exactly the base: scores 1 everywhere
        Candidate("task_arithmetic", {"scale": 0.0}, label="the same again"),
        Candidate("ram"),
    ]
    out = tmp_path / "best"
    ranked = search(base, agents, tried, tasks, generation=settings, out=out, progress=False)
    assert [r.candidate for r in ranked[:2]] == tried[1:3]  # ties keep the order given
    assert ranked[0].scores == {"first": 1.0, "second": 1.0} and ranked[0].score == 1.0
    assert ranked[-1].score < 1.0  # the full deltas change what the model generates
    assert {r.candidate.name for r in ranked} == {
        "task_arithmetic(scale=1.0)",
        "task_arithmetic(scale=0.0)",
        "the same again",
        "ram",
    }
    assert ranked[0].path == str(out) and all(r.path is None for r in ranked[1:])
    kept, original = load_file(out / "model.safetensors"), load_file(base / "model.safetensors")
    assert all(torch.equal(kept[k], original[k]) for k in original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]  # no scratch folders left


def test_search_without_out_leaves_nothing(case, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base, agents, tasks, settings = case
    ranked = search(base, agents, grid("ties", keep=[0.2], scale=[0.5, 1.0]), tasks,
                    generation=settings, progress=False)  # fmt: skip
    assert len(ranked) == 2 and all(r.path is None for r in ranked)
    assert list(tmp_path.iterdir()) == []


def test_grid_is_every_combination():
    got = grid("ties", keep=[0.1, 0.2], scale=[0.5, 1.0])
    assert [c.params for c in got] == [
        {"keep": 0.1, "scale": 0.5},
        {"keep": 0.1, "scale": 1.0},
        {"keep": 0.2, "scale": 0.5},
        {"keep": 0.2, "scale": 1.0},
    ]


def test_bad_search_input_is_one_clear_error(case, tmp_path):
    base, agents, tasks, settings = case
    with pytest.raises(InputError, match="at least one candidate"):
        search(base, agents, [], tasks)
    with pytest.raises(InputError, match="already exists"):
        search(base, agents, [Candidate("ram")], tasks, out=tmp_path)
    with pytest.raises(InputError, match="unknown"):
        search(base, agents, [Candidate("no_such_method")], tasks, progress=False)
