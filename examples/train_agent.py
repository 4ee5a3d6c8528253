"""Train one RL agent with GRPO and a RAMCallback; run one job per agent, all into one store.

    accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml \\
        examples/train_agent.py --config recipes/grpo/digits.yaml
    python examples/train_agent.py --config recipes/grpo/letters.yaml --max_steps 20

The recipe is one flat YAML mapping, parsed the way TRL's own scripts parse theirs
(``trl.TrlParser``): its keys are fields of :class:`AgentArguments` (below), ``trl.GRPOConfig``,
``trl.ModelConfig`` and ``ram_trl.RAMConfig``, and every field is also a command-line flag that
overrides the file (``--max_steps 100 --store /shared/store --agent code --overwrite``).
``python examples/train_agent.py --help`` lists them all.

Each job snapshots its task vector into the store at every save; from the second agent on, the
callback merges the newest snapshot of every agent (RAM+ by default) into the store's next
``merged/merge-<N>/`` (``merged/latest`` points at the newest), unless another job has merged
that state already (``merge: watcher`` leaves merging to ``ram-trl watch``), and logs
``eval_merged/<task>/reward`` next to ``eval_agent/<task>/reward``. Jobs may run one after
another or at the same time.

Offline by default: without ``model_name_or_path`` the model is a tiny, seeded Qwen2 with a
character tokenizer (``ram_trl.testing``), and the dataset a few built-in prompts. For a real
run, set ``model_name_or_path`` (a folder or Hub id), ``dataset_name`` (a dataset with a
``prompt`` column), ``reward_funcs`` and the GRPO settings; ``use_peft: true`` trains LoRA.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from pkgutil import resolve_name

from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, TrlParser

from ram_trl import RAMConfig, attach

OFFLINE_PROMPTS = ["1+1=", "2*3=", "say hi:", "abc", "7-4=", "name a color:"]


@dataclass
class AgentArguments(ScriptArguments):
    """What this script needs beyond TRL's dataset arguments (``dataset_name``, ...)."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "GRPO reward functions as import paths 'module:function'."},
    )
    tiny_base_dir: str = field(
        default="runs/tiny-base",
        metadata={"help": "Where the offline tiny base is written, without model_name_or_path."},
    )


def make_parser() -> TrlParser:
    return TrlParser((AgentArguments, GRPOConfig, ModelConfig, RAMConfig))


Arguments = tuple[AgentArguments, GRPOConfig, ModelConfig, RAMConfig]


def parse(argv: list[str] | None = None) -> Arguments:
    """Parse the recipe and the command line; a mistake in either exits with one line."""
    if os.getcwd() not in sys.path:  # reward modules next to the user, as TRL's scripts allow
        sys.path.insert(0, os.getcwd())
    try:
        script, training, model, ram = make_parser().parse_args_and_config(argv)
        if not script.reward_funcs:
            raise ValueError("reward_funcs: name at least one reward function 'module:function'")
        if model.load_in_4bit or model.load_in_8bit:
            raise ValueError("load_in_4bit / load_in_8bit: this script trains unquantized models")
        script.reward_funcs = [_resolve(name) for name in script.reward_funcs]
    except ValueError as e:  # includes ram_trl's InputError, TrlParser's unknown recipe keys
        sys.exit(f"error: {e}")
    return script, training, model, ram


def _resolve(name: str):
    if ":" not in name:
        raise ValueError(f"reward function {name!r} must be an import path 'module:function'")
    try:
        return resolve_name(name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import reward function {name!r}: {e}") from None


def tiny_base(folder: Path, training: GRPOConfig) -> Path:
    """The offline base, written once: by the main process while the other ranks wait, and
    atomically, so a concurrent job that shares the folder never reads a partial one. It is
    seeded, so whichever job writes it, every agent starts from the same bits."""
    from ram_trl.errors import OutputExistsError
    from ram_trl.io import atomic_directory
    from ram_trl.testing import save_tiny_base

    with training.main_process_first(local=False, desc="writing the tiny base model"):
        if not (folder / "config.json").is_file():
            with contextlib.suppress(OutputExistsError), atomic_directory(folder) as tmp:
                save_tiny_base(tmp)  # OutputExistsError: another job published it first
    return folder


def load_prompts(script: AgentArguments, training: GRPOConfig):
    """(train, eval) datasets: ``dataset_name`` as TRL's scripts load it, or the offline prompts."""
    from datasets import Dataset, load_dataset

    if script.dataset_name is None:
        return Dataset.from_dict({"prompt": OFFLINE_PROMPTS * 8}), None
    data = load_dataset(
        script.dataset_name, name=script.dataset_config, streaming=script.dataset_streaming
    )
    evaluate = training.eval_strategy != "no"
    return data[script.dataset_train_split], data[script.dataset_test_split] if evaluate else None


def main(argv: list[str] | None = None) -> None:
    from ram_trl.errors import RAMError

    arguments = parse(argv)
    try:
        train(*arguments)
    except RAMError as e:  # e.g. the store already holds this agent: one line, no traceback
        sys.exit(f"error: {e}")


def train(
    script: AgentArguments, training: GRPOConfig, model_args: ModelConfig, ram: RAMConfig
) -> None:
    from trl import get_peft_config

    model = model_args.model_name_or_path or str(tiny_base(Path(script.tiny_base_dir), training))
    training.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": training.trust_remote_code,
        **(training.model_init_kwargs or {}),
    }
    train_data, eval_data = load_prompts(script, training)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=script.reward_funcs,
        args=training,
        train_dataset=train_data,
        eval_dataset=eval_data,
        peft_config=get_peft_config(model_args),
    )
    attach(trainer, ram)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    from ram_trl.snapshot import SnapshotStore

    latest = SnapshotStore(ram.store).merged.latest()
    merged = f"{latest.path} ({latest.steps})" if latest else "none yet"
    trainer.accelerator.print(
        f"agent {ram.agent}: {trainer.state.global_step} steps; latest merged model: {merged}"
    )
    trainer.accelerator.end_training()  # closes the trackers and the process group


if __name__ == "__main__":
    main()
