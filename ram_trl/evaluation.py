"""Scoring a model on prompts with verifiable rewards: the evaluation behind ``RAMCallback``,
``ram_trl.search`` and the demo.

An :class:`EvalTask` is prompts plus the reward functions that score completions of them, the same
callables a ``trl.GRPOTrainer`` takes. :func:`evaluate` generates one completion per prompt and
calls the reward functions with the keyword arguments ``GRPOTrainer`` (TRL 1.x) passes them
(``prompts=``, ``completions=``, ``completion_ids=``, the task's ``columns`` as dataset columns,
``trainer_state=``, ``log_extra=``, ``log_metric=``), and sums them with the task's
``reward_weights`` as GRPO does, so a merged model, an agent and the base are scored by exactly
the rewards the agents were trained on. :func:`check_task` calls each function once on one prompt,
so that a broken one fails before training instead of at the first evaluation. Sampling runs
under a forked RNG with its own seed: evaluating never changes what training draws next.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.errors import InputError

#: a GRPO reward function: ``f(prompts, completions, **kwargs) -> list[float | None]``
RewardFunc = Callable[..., Sequence[float | None]]


def _import(path: str) -> Any:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise InputError(f"reward function {path!r} must be an import path 'module:function'")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise InputError(f"cannot import reward function {path!r}: {e}") from None
    return obj


@dataclass
class EvalTask:
    """Prompts plus the reward functions that score completions of them (the same callables a
    ``GRPOTrainer`` takes). ``columns`` are extra per-prompt keyword arguments for the reward
    functions, like the dataset columns GRPO passes (e.g. ``{"answer": [...]}``)."""

    name: str
    prompts: list[Any]
    reward_funcs: list[RewardFunc] | RewardFunc
    columns: dict[str, list[Any]] = field(default_factory=dict)
    reward_weights: list[float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise InputError(f"eval task name {self.name!r} must be a non-empty string without '/'")
        funcs = self.reward_funcs
        funcs = [funcs] if callable(funcs) or isinstance(funcs, str) else list(funcs)
        self.reward_funcs = [_import(f) if isinstance(f, str) else f for f in funcs]
        if not self.reward_funcs or not all(callable(f) for f in self.reward_funcs):
            raise InputError(f"eval task {self.name!r}: reward_funcs must be callables")
        self.prompts = list(self.prompts)
        if not self.prompts:
            raise InputError(f"eval task {self.name!r} has no prompts")
        weights = self.reward_weights
        if weights is not None and (
            len(weights) != len(self.reward_funcs)
            or not all(isinstance(w, (int, float)) for w in weights)
        ):
            raise InputError(
                f"eval task {self.name!r}: reward_weights {weights!r} must be one number per "
                f"reward function ({len(self.reward_funcs)})"
            )
        for key, values in self.columns.items():
            if len(values) != len(self.prompts):
                raise InputError(
                    f"eval task {self.name!r}: column {key!r} has {len(values)} values for "
                    f"{len(self.prompts)} prompts"
                )


@dataclass(frozen=True)
class GenerationSettings:
    """How :func:`evaluate` generates: greedy by default; sampling is seeded. ``top_k`` /
    ``min_p`` (None: off) and ``temperature`` / ``top_p`` apply when sampling;
    ``repetition_penalty`` always, as in ``GRPOConfig``."""

    batch_size: int = 8
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"generation {name} must be a positive integer, got {value!r}")


@dataclass
class TrainerContext:
    """What an evaluation inside training takes from its trainer: its generation settings (by
    :class:`GenerationSettings` field name), its reward functions and ``reward_weights``, and its
    state, passed to reward functions as ``trainer_state`` as GRPO does."""

    generation: dict[str, Any] = field(default_factory=dict)
    reward_funcs: list[Any] = field(default_factory=list)
    reward_weights: list[float] | None = None
    state: Any = None

    def task(self, task: EvalTask) -> EvalTask:
        """``task`` with the trainer's reward weights when it has none of its own and scores
        with the trainer's reward functions (the same names, in the same order)."""
        if task.reward_weights is not None or self.reward_weights is None:
            return task
        if [func_name(f) for f in task.reward_funcs] != [func_name(f) for f in self.reward_funcs]:
            return task
        return dataclasses.replace(task, reward_weights=list(self.reward_weights))


def _is_conversational(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


@contextmanager
def _eval_mode(model: nn.Module, tokenizer: Any):
    training, side = model.training, getattr(tokenizer, "padding_side", "right")
    model.eval()
    tokenizer.padding_side = "left"  # decoder-only generation continues the prompt's last token
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(training)
        tokenizer.padding_side = side


def _mean(values: list[float | None]) -> float:
    valid = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(valid) / len(valid) if valid else float("nan")


def func_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _dummy_completion(prompt: Any) -> Any:
    return [{"role": "assistant", "content": ""}] if _is_conversational(prompt) else ""


def check_task(task: EvalTask, trainer_state: Any = None) -> None:
    """Call every reward function of ``task`` once, on its first prompt and an empty completion,
    with the keyword arguments evaluation will pass; InputError naming the task and the function
    when one raises, does not take GRPO's keyword arguments, or returns other than one number."""
    logs = _Logs()
    for func in task.reward_funcs:
        name = func_name(func)
        where = f"eval task {task.name!r}: reward function {name!r}"
        try:
            rewards = list(
                func(
                    prompts=task.prompts[:1],
                    completions=[_dummy_completion(task.prompts[0])],
                    completion_ids=[[]],
                    **{key: values[:1] for key, values in task.columns.items()},
                    **logs.kwargs(trainer_state),
                )
            )
        except TypeError as e:
            if "unexpected keyword" in str(e):
                raise InputError(
                    f"{where} does not take GRPOTrainer's keyword arguments ({e}): give it a "
                    "**kwargs parameter"
                ) from None
            raise InputError(f"{where} failed on the task's first prompt: {e!r}") from None
        except Exception as e:
            raise InputError(f"{where} failed on the task's first prompt: {e!r}") from None
        if len(rewards) != 1:
            raise InputError(f"{where} returned {len(rewards)} rewards for 1 completion")
        if rewards[0] is not None and not isinstance(rewards[0], (int, float)):
            try:
                float(rewards[0])
            except (TypeError, ValueError):
                raise InputError(f"{where} returned {rewards[0]!r}, not a number") from None


class _Logs:
    """What reward functions log through ``log_metric`` / ``log_extra`` during an evaluation."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list[Any]] = {}

    def kwargs(self, trainer_state: Any) -> dict[str, Any]:
        return {
            "trainer_state": trainer_state,
            "log_extra": lambda column, values: self.extra.setdefault(column, []).extend(values),
            "log_metric": lambda name, value: self.metrics.setdefault(name, []).append(value),
        }


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    task: EvalTask,
    generation: GenerationSettings | None = None,
    *,
    trainer_state: Any = None,
    completions_table: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Generate a completion for every prompt of ``task`` and score it with the task's reward
    functions: ``{"reward": mean weighted sum, <func name>: mean reward of that function,
    <metric>: mean of what the functions logged with log_metric}``. ``completions_table``, when
    given, receives one row per prompt (prompt, completion, each reward, logged extra columns),
    like the completions table ``GRPOTrainer`` logs."""
    config = generation or GenerationSettings()
    device = next(model.parameters()).device
    completions: list[Any] = []
    completion_ids: list[list[int]] = []
    with _eval_mode(model, tokenizer):
        torch.manual_seed(config.seed)
        for start in range(0, len(task.prompts), config.batch_size):
            batch = task.prompts[start : start + config.batch_size]
            texts = [
                tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                if _is_conversational(p)
                else p
                for p in batch
            ]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            out = model.generate(
                **enc,
                max_new_tokens=config.max_new_tokens,
                do_sample=config.do_sample,
                temperature=config.temperature if config.do_sample else None,
                top_p=config.top_p if config.do_sample else None,
                top_k=config.top_k if config.do_sample else None,
                min_p=config.min_p if config.do_sample else None,
                repetition_penalty=config.repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
                # only this rank generates: under ZeRO-3/FSDP transformers would otherwise
                # all-reduce at every step with ranks that are waiting at the barrier
                synced_gpus=False,
            )
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                ids = (
                    row[: row.index(tokenizer.eos_token_id) + 1]
                    if tokenizer.eos_token_id in row
                    else row
                )
                ids = [i for i in ids if i != tokenizer.pad_token_id]
                completion_ids.append(ids)
                completions.append(tokenizer.decode(ids, skip_special_tokens=True))
    if _is_conversational(task.prompts[0]):
        completions = [[{"role": "assistant", "content": c}] for c in completions]
    total = [0.0] * len(completions)
    result: dict[str, float] = {}
    logs = _Logs()
    weights = task.reward_weights or [1.0] * len(task.reward_funcs)
    columns: dict[str, list[Any]] = {"prompt": list(task.prompts), "completion": completions}
    for func, weight in zip(task.reward_funcs, weights, strict=True):
        rewards = list(
            func(
                prompts=task.prompts,
                completions=completions,
                completion_ids=completion_ids,
                **task.columns,
                **logs.kwargs(trainer_state),
            )
        )
        if len(rewards) != len(completions):
            raise InputError(
                f"eval task {task.name!r}: reward function {func_name(func)!r} returned "
                f"{len(rewards)} rewards for {len(completions)} completions"
            )
        result[func_name(func)] = _mean(rewards)
        columns[func_name(func)] = rewards
        total = [  # None (or NaN) counts as 0, as GRPO's nansum does
            t + (0.0 if r is None or math.isnan(float(r)) else weight * float(r))
            for t, r in zip(total, rewards, strict=True)
        ]
    result["reward"] = _mean(total)
    for name, values in logs.metrics.items():
        result.setdefault(name, _mean(values))
    if completions_table is not None:
        columns.update(logs.extra)
        for i in range(len(completions)):
            completions_table.append({k: v[i] for k, v in columns.items() if i < len(v)})
    return result


@contextmanager
def whole_on_this_rank() -> Iterator[None]:
    """Load models whole on one rank while DeepSpeed ZeRO-3 trains.

    Under ZeRO-3, transformers builds every ``from_pretrained`` model inside
    ``deepspeed.zero.Init``, which partitions it across ranks: a collective that the other ranks,
    waiting at the callback's barrier, never join, so rank 0 would hang. Evaluation models are
    rank 0's own, so the training run's ZeRO-3 setting is lifted while they load.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers without the integration
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def load_model(path: str | Path, base: str | Path, device: torch.device, lora: bool) -> nn.Module:
    """A merged model folder (or a LoRA adapter over ``base``) loaded for generation."""
    from transformers import AutoModelForCausalLM

    with whole_on_this_rank():
        if not lora:
            return AutoModelForCausalLM.from_pretrained(path).to(device)
        from peft import PeftModel

        model = AutoModelForCausalLM.from_pretrained(base)
        return PeftModel.from_pretrained(model, str(path)).to(device)


def score_folder(
    path: str | Path,
    tasks: Sequence[EvalTask],
    generation: GenerationSettings | None = None,
    *,
    device: str | torch.device = "cpu",
    tokenizer: Any | None = None,
) -> dict[str, float]:
    """The mean reward (``"reward"`` of :func:`evaluate`) of the model folder at ``path`` on
    each task, by task name; the folder's own tokenizer unless one is given. The model is loaded
    in float32 (merges and checkpoints may be stored in bf16) and dropped afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return {task.name: evaluate(model, tokenizer, task, generation)["reward"] for task in tasks}
