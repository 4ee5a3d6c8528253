"""One GRPO run of the demo, in its own process: ``python -m ram_trl.demo.agent SPEC.json``.

A specialist trains on one task with the real ``trl.GRPOTrainer`` and a ``RAMCallback`` that
snapshots into the store every agent shares and, from the second agent on, merges and evaluates
the store's newest snapshots while the agents are still training. The joint-RL baseline trains
on the mixture of every task, with no callback. Each run trains in float32 and its checkpoints
(store snapshots, ``final/``) are stored in bfloat16, as RL frameworks save theirs.

The run reports its progress to ``progress.json`` (the parent draws one bar per run) and writes
the trainer's log history to ``log.json`` when it ends.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RunSpec:
    """What one run trains; written by the parent as JSON."""

    name: str
    tasks: list[str]
    base: str
    out: str
    train: dict[str, list[str]]  # columns: prompt, answer, task
    grpo: dict[str, Any]  # trl.GRPOConfig fields
    store: str | None = None  # None: no RAMCallback (the joint-RL run)
    merged_eval: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # task -> columns
    threads: int = 1

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path


def reward(
    prompts: list[Any], completions: list[Any], answer: list[str], task: list[str], **kwargs: Any
) -> list[float]:
    """The demo's reward for a batch that may mix tasks: each row scored by its task's reward."""
    from ram_trl.demo.tasks import TASKS

    out = [0.0] * len(completions)
    for name in set(task):
        rows = [i for i, t in enumerate(task) if t == name]
        scores = TASKS[name].reward(
            prompts=[prompts[i] for i in rows],
            completions=[completions[i] for i in rows],
            answer=[answer[i] for i in rows],
        )
        for i, score in zip(rows, scores, strict=True):
            out[i] = score
    return out


def _progress_callback(path: Path):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            path.write_text(json.dumps({"step": state.global_step, "max": state.max_steps}))

    return Progress()


def run(spec: RunSpec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from ram_trl import EvalTask, RAMConfig, attach
    from ram_trl.demo.tasks import TASKS

    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    model = AutoModelForCausalLM.from_pretrained(spec.base, dtype=torch.float32)
    args = GRPOConfig(
        output_dir=str(out / "trainer"),
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        save_strategy="steps",
        save_only_model=True,
        save_total_limit=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        **spec.grpo,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict(spec.train),
        processing_class=tokenizer,
        callbacks=[_progress_callback(out / "progress.json")],
    )
    if spec.store is not None:
        tasks = [
            EvalTask(name, columns["prompt"], TASKS[name].reward, {"answer": columns["answer"]})
            for name, columns in spec.merged_eval.items()
        ]
        ram = RAMConfig(
            store=spec.store,
            agent=spec.name,
            base=spec.base,
            snapshot_dtype="bfloat16",
            overwrite=True,
            merge_method="ram_plus",
            merge_background=False,
            eval_tasks=tasks,
            eval_agent=False,
            eval_batch_size=64,
            eval_max_new_tokens=max(TASKS[t].max_completion_tokens for t in spec.merged_eval),
        )
        attach(trainer, ram)
    trainer.train()
    model.to(torch.bfloat16).save_pretrained(out / "final")
    tokenizer.save_pretrained(out / "final")
    (out / "log.json").write_text(json.dumps(trainer.state.log_history))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = json.loads(Path(argv[0]).read_text())
    run(RunSpec(**data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
