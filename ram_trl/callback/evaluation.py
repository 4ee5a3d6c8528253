"""Generate completions for an :class:`EvalTask` and score them with its reward functions.

The reward functions are called as ``GRPOTrainer`` calls them (``prompts=``, ``completions=``,
``completion_ids=``, plus the task's ``columns``), so the merged model, the agent and the base are
scored by exactly the rewards the agents were trained on. Sampling runs under a forked RNG with
its own seed: evaluating never changes what training draws next.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ram_trl.callback.config import EvalTask, RAMConfig


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


def evaluate(
    model: nn.Module, tokenizer: Any, task: EvalTask, config: RAMConfig
) -> dict[str, float]:
    """``{"reward": mean summed reward, <func name>: mean reward of that function}``."""
    device = next(model.parameters()).device
    completions: list[Any] = []
    completion_ids: list[list[int]] = []
    with _eval_mode(model, tokenizer):
        torch.manual_seed(config.eval_seed)
        for start in range(0, len(task.prompts), config.eval_batch_size):
            batch = task.prompts[start : start + config.eval_batch_size]
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
                max_new_tokens=config.eval_max_new_tokens,
                do_sample=config.eval_do_sample,
                temperature=config.eval_temperature if config.eval_do_sample else None,
                top_p=config.eval_top_p if config.eval_do_sample else None,
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
    for func in task.reward_funcs:
        rewards = list(
            func(
                prompts=task.prompts,
                completions=completions,
                completion_ids=completion_ids,
                **task.columns,
            )
        )
        name = getattr(func, "__name__", type(func).__name__)
        result[name] = _mean(rewards)
        total = [t + (0.0 if r is None else float(r)) for t, r in zip(total, rewards, strict=True)]
    result["reward"] = _mean(total)
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
