"""Reward functions of the offline example agents (``recipes/grpo/*.yaml``).

Each scores a completion by the share of one kind of character in it, so the three agents pull
the same tiny base model in different directions. They have the signature ``trl.GRPOTrainer``
calls, and the recipes name them by import path (``toy_rewards:digits``), for training and for
the evaluation of the merged model alike.
"""

from __future__ import annotations

from collections.abc import Callable


def _share(keep: Callable[[str], bool], completions: list[str]) -> list[float]:
    return [sum(map(keep, text)) / max(1, len(text)) for text in completions]


def digits(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The share of digits in each completion."""
    return _share(str.isdigit, completions)


def letters(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The share of letters in each completion."""
    return _share(str.isalpha, completions)


def symbols(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The share of arithmetic symbols (``+-*=()``) in each completion."""
    return _share("+-*=()".__contains__, completions)
