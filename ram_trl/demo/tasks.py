"""The demo's synthetic agentic tasks: seeded prompt generators and verifiable rewards.

Each task is a skill an RL agent would be trained for, with its own tokens where possible:

- ``tool``: a well-formed tool call with the right arguments (``weather in paris?`` ->
  ``call:weather(city=paris)``);
- ``arith``: arithmetic (``12+7=`` -> ``19``);
- ``memory``: recall a key's value from a context of key/value pairs (``k3=x k7=q k1=m k7?`` ->
  ``q``);
- ``code``: a small string transformation (``rev abc:`` -> ``cba``).

Rewards are plain GRPO reward functions (``f(prompts, completions, answer, **kwargs)``): the same
callables train the agents, score the validation split that tunes the baselines, and score the
test split of the final table. Partial credit gives GRPO a reward spread inside a group of
completions before the agent is right; a malformed answer always scores 0.

Splits are disjoint by construction: every distinct prompt of a task is drawn once, in a seeded
order, and dealt to test, then validation, then training.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TOOLS = ("weather", "time", "news", "map", "hotel")
CITIES = (
    "paris", "rome", "oslo", "lima", "cairo", "tokyo", "delhi", "quito", "dakar", "seoul",
    "kyiv", "bern", "doha", "riga", "sofia", "hanoi", "accra", "lagos", "perth", "miami",
    "baku", "minsk", "tunis", "lyon", "porto", "dubai", "milan", "turin", "nice", "leeds",
    "osaka", "kobe", "dhaka", "lusaka", "harare", "tampa", "dallas", "boston", "denver", "austin",
)  # fmt: skip
KEYS = tuple(f"k{i}" for i in range(10))
VALUES = tuple("abcdefghijklmnopqrstuvwxyz")
MEMORY_PAIRS = 3
ARITH_MAX = 19  # operands in 0..19: learnable by a tiny model, unsaturated after brief SFT
WORD_LETTERS = "abcdefgh"
WORD_LENGTHS = (3, 4)


def _text(completion: Any) -> str:
    """A completion as text: GRPO passes strings for plain prompts, messages for chat prompts."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return completion.strip()


# --- rewards -----------------------------------------------------------------------------------

_CALL = re.compile(r"call:([a-z]+)\(city=([a-z]+)\)")


def tool_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1 for the exact call; a well-formed call scores 0.5 for the right tool and 0.5 for the
    right city; anything that is not ``call:NAME(city=CITY)`` scores 0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        got, want = _CALL.fullmatch(_text(completion)), _CALL.fullmatch(expected)
        assert want is not None, f"tool answer {expected!r} is not a call"
        if got is None:
            rewards.append(0.0)
        else:
            rewards.append(0.5 * (got[1] == want[1]) + 0.5 * (got[2] == want[2]))
    return rewards


def arith_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """1 for the right number; a wrong number scores up to 0.5 by closeness (0 when 5 or more
    off); anything that is not a number scores 0."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = _text(completion)
        if not text.isdigit():
            rewards.append(0.0)
            continue
        error = abs(int(text) - int(expected))
        rewards.append(1.0 if error == 0 else max(0.0, 0.5 * (1 - error / 5)))
    return rewards


def memory_reward(
    prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str], **kwargs: Any
) -> list[float]:
    """1 for the value stored under the asked key; 0.2 for another value of the context (the
    agent retrieved, but the wrong slot); anything else scores 0."""
    rewards = []
    for prompt, completion, expected in zip(prompts, completions, answer, strict=True):
        text = _text(completion)
        stored = {pair.split("=")[1] for pair in _text(prompt).split() if "=" in pair}
        rewards.append(1.0 if text == expected else 0.2 if text in stored else 0.0)
    return rewards


def code_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs: Any) -> list[float]:
    """The share of positions right, for an answer of the right length; 0 for any other."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = _text(completion)
        if len(text) != len(expected):
            rewards.append(0.0)
        else:
            rewards.append(sum(a == b for a, b in zip(text, expected, strict=True)) / len(expected))
    return rewards


# --- generators --------------------------------------------------------------------------------


def _tool_prompts() -> list[tuple[str, str]]:
    return [(f"{t} in {c}?", f"call:{t}(city={c})") for t in TOOLS for c in CITIES]


def _arith_prompts() -> list[tuple[str, str]]:
    return [(f"{a}+{b}=", str(a + b)) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]


def _memory_prompt(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(KEYS, MEMORY_PAIRS)
    values = [rng.choice(VALUES) for _ in keys]
    asked = rng.randrange(MEMORY_PAIRS)
    context = " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    return f"{context} {keys[asked]}?", values[asked]


def _code_prompt(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(WORD_LETTERS) for _ in range(rng.choice(WORD_LENGTHS)))
    return f"rev {word}:", word[::-1]


@dataclass(frozen=True)
class Task:
    """One synthetic task: how to draw its (prompt, answer) pairs and score completions.

    ``enumerate`` lists every distinct pair of a task with a small space (tool calls, sums);
    ``draw`` samples one pair of a task whose space is too large to list (memory, code).
    ``max_completion_tokens`` is the answer's longest length plus end-of-sequence, which bounds
    generation in training and evaluation alike.
    """

    name: str
    reward: Callable[..., list[float]]
    max_completion_tokens: int
    enumerate: Callable[[], list[tuple[str, str]]] | None = None
    draw: Callable[[random.Random], tuple[str, str]] | None = None

    def pairs(self, count: int, seed: int) -> list[tuple[str, str]]:
        """``count`` distinct (prompt, answer) pairs in a seeded order."""
        rng = random.Random(f"{self.name}-{seed}")
        if self.enumerate is not None:
            pairs = self.enumerate()
            rng.shuffle(pairs)
            if count > len(pairs):
                raise ValueError(f"task {self.name} has only {len(pairs)} distinct prompts")
            return pairs[:count]
        assert self.draw is not None
        seen: dict[str, str] = {}
        for _ in range(100 * count):
            prompt, answer = self.draw(rng)
            seen.setdefault(prompt, answer)
            if len(seen) == count:
                return list(seen.items())
        raise ValueError(f"task {self.name}: could not draw {count} distinct prompts")


TASKS: dict[str, Task] = {
    "tool": Task(
        "tool", tool_reward, max(len(a) for _, a in _tool_prompts()) + 1, enumerate=_tool_prompts
    ),
    "arith": Task("arith", arith_reward, 3, enumerate=_arith_prompts),
    "memory": Task("memory", memory_reward, 2, draw=_memory_prompt),
    "code": Task("code", code_reward, max(WORD_LENGTHS) + 1, draw=_code_prompt),
}


@dataclass(frozen=True)
class Split:
    """The prompts and answers of one task in one split."""

    task: str
    prompts: list[str]
    answers: list[str]

    def rows(self) -> dict[str, list[str]]:
        """Dataset columns as ``GRPOTrainer`` reads them (``prompt`` plus reward columns)."""
        return {"prompt": self.prompts, "answer": self.answers}


def splits(task: str, sizes: dict[str, int], seed: int) -> dict[str, Split]:
    """Disjoint splits of ``task``: ``sizes`` maps split name to prompt count, dealt in the
    order given (the demo puts test first, so its prompts do not depend on the training size)."""
    pairs = TASKS[task].pairs(sum(sizes.values()), seed)
    out, start = {}, 0
    for name, size in sizes.items():
        chunk = pairs[start : start + size]
        out[name] = Split(task, [p for p, _ in chunk], [a for _, a in chunk])
        start += size
    return out
