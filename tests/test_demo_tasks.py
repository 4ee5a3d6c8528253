"""The demo's tasks: hand-checked rewards, seeded generators, disjoint splits."""

from __future__ import annotations

import pytest

from ram_trl.demo.agent import reward
from ram_trl.demo.config import DemoConfig
from ram_trl.demo.pipeline import make_splits
from ram_trl.demo.tasks import (
    TASKS,
    arith_reward,
    code_reward,
    memory_reward,
    splits,
    tool_reward,
)

CALL = "call:weather(city=paris)"


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (CALL, 1.0),
        (" call:weather(city=paris) ", 1.0),  # surrounding space is not the answer
        ("call:time(city=paris)", 0.5),  # right city, wrong tool
        ("call:weather(city=rome)", 0.5),  # right tool, wrong city
        ("call:news(city=oslo)", 0.0),  # well formed, both wrong
        ("call:weather(paris)", 0.0),  # malformed: no argument name
        ("weather(city=paris)", 0.0),  # malformed: no call: prefix
        ("call:weather(city=paris)x", 0.0),  # trailing text
        ("", 0.0),
    ],
)
def test_tool_reward(completion, expected):
    assert tool_reward([completion], [CALL]) == [expected]


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("19", 1.0),
        ("18", 0.4),
        ("21", 0.3),
        ("24", 0.0),
        ("99", 0.0),
        ("1 9", 0.0),
        ("", 0.0),
        ("x", 0.0),
    ],
)
def test_arith_reward(completion, expected):
    assert arith_reward([completion], ["19"]) == [pytest.approx(expected)]


def test_memory_reward_credits_only_the_asked_value():
    prompt = "k3=x k7=q k1=m k7?"
    got = memory_reward([prompt] * 4, ["q", "x", "z", "qq"], ["q"] * 4)
    assert got == [1.0, 0.2, 0.0, 0.0]


def test_code_reward_scores_positions_of_same_length_answers():
    assert code_reward(["cba", "cbx", "abc", "cb", "cbaa"], ["cba"] * 5) == [
        1.0,
        pytest.approx(2 / 3),
        pytest.approx(1 / 3),
        0.0,
        0.0,
    ]


def test_chat_style_completions_are_scored_by_their_content():
    assert tool_reward([[{"role": "assistant", "content": CALL}]], [CALL]) == [1.0]


def test_mixed_batch_reward_dispatches_by_task():
    got = reward(
        prompts=["weather in paris?", "2+3=", "k1=a k2=b k2?"],
        completions=[CALL, "5", "a"],
        answer=[CALL, "5", "b"],
        task=["tool", "arith", "memory"],
    )
    assert got == [1.0, 1.0, 0.2]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_generators_answer_their_prompts_and_are_seeded(task):
    pairs = TASKS[task].pairs(30, seed=1)
    assert pairs == TASKS[task].pairs(30, seed=1)
    assert pairs != TASKS[task].pairs(30, seed=2)
    assert len({p for p, _ in pairs}) == 30
    rewards = TASKS[task].reward(
        prompts=[p for p, _ in pairs],
        completions=[a for _, a in pairs],
        answer=[a for _, a in pairs],
    )
    assert rewards == [1.0] * 30  # every generated answer is right by its own reward
    longest = max(len(a) for _, a in pairs) + 1  # characters + end of sequence
    assert longest <= TASKS[task].max_completion_tokens


def test_generated_examples_are_what_the_docs_say():
    prompt, answer = next(
        (p, a) for p, a in TASKS["tool"].pairs(200, 0) if p == "weather in paris?"
    )
    assert answer == CALL
    arith = dict(TASKS["arith"].pairs(400, 0))
    assert arith["12+7="] == "19" and len(arith) == 400
    prompt, answer = TASKS["memory"].pairs(1, 0)[0]
    *context, question = prompt.split()
    assert dict(kv.split("=") for kv in context)[question.rstrip("?")] == answer
    prompt, answer = TASKS["code"].pairs(1, 0)[0]
    assert prompt.startswith("rev ") and prompt.endswith(":") and answer == prompt[4:-1][::-1]


@pytest.mark.parametrize("quick", [False, True])
def test_demo_splits_are_disjoint_and_test_does_not_depend_on_other_sizes(quick):
    config = DemoConfig.preset(quick, agents=4)
    data = make_splits(config)
    assert sorted(data) == sorted(config.tasks)
    for task, parts in data.items():
        sets = {name: set(split.prompts) for name, split in parts.items()}
        assert len(sets["test"]) == config.test_prompts and len(sets["val"]) == config.val_prompts
        assert all(len(s) == len(parts[n].prompts) for n, s in sets.items())  # no repeats
        assert not sets["test"] & sets["val"] and not sets["test"] & sets["train"]
        assert not sets["val"] & sets["train"] and sets["train"]
        bigger = splits(task, {"test": config.test_prompts, "val": 3, "train": 5}, config.seed)
        assert bigger["test"].prompts == parts["test"].prompts
