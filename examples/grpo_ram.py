"""Train one GRPO agent with a RAMCallback; run it once per agent, all sharing one store.

    python examples/grpo_ram.py recipes/train/grpo_ram.yaml --agent digits --reward digits
    python examples/grpo_ram.py recipes/train/grpo_ram.yaml --agent letters --reward letters

Each run snapshots its task vector into the store at every save; from the second agent on, the
callback merges the newest snapshot of every agent with RAM+ into ``<store>/merged/step-<N>/``
and logs ``eval_merged/<task>/reward`` next to ``eval_agent/<task>/reward``. The two runs may
also run at the same time. Offline: the model is a tiny randomly initialised Qwen2 with a
character tokenizer (``ram_trl.testing``). With a real model, replace ``build_base`` by e.g.
``AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")`` (and its tokenizer), and
set ``ram.base`` to that checkpoint's folder so that theta_0 is streamed from it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def digits(prompts, completions, **kwargs) -> list[float]:
    """Reward of the 'digits' agent: the share of digits in the completion."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def letters(prompts, completions, **kwargs) -> list[float]:
    """Reward of the 'letters' agent: the share of letters in the completion."""
    return [sum(c.isalpha() for c in text) / max(1, len(text)) for text in completions]


REWARDS = {"digits": digits, "letters": letters}


def build_base(folder: Path) -> Path:
    """A tiny base model + tokenizer, written once (real models: see the module docstring)."""
    from ram_trl.testing import save_tiny_base

    if not (folder / "config.json").is_file():
        save_tiny_base(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from ram_trl.callback import RAMConfig, attach

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML with `train` (GRPOConfig) and `ram` (RAMConfig)")
    parser.add_argument("--agent", help="agent name (overrides ram.agent)")
    parser.add_argument("--reward", choices=sorted(REWARDS), default="digits")
    parser.add_argument("--store", help="snapshot store (overrides ram.store)")
    parser.add_argument("--base-dir", default="runs/grpo_ram/base", help="tiny base folder")
    parser.add_argument("--output-dir", help="overrides train.output_dir")
    parser.add_argument("--max-steps", type=int, help="overrides train.max_steps")
    parser.add_argument("--port", help="a MASTER_PORT of its own, for concurrent launches")
    args = parser.parse_args(argv)

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    ram = dict(recipe["ram"])
    ram.update({k: v for k, v in (("agent", args.agent), ("store", args.store)) if v})
    train = dict(recipe["train"])
    train["output_dir"] = args.output_dir or f"{train['output_dir']}/{ram['agent']}"
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    config = RAMConfig.from_dict(ram)  # validated before anything is built

    base = build_base(Path(args.base_dir))
    model = AutoModelForCausalLM.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = ["1+1=", "2*3=", "say hi:", "abc", "7-4=", "name a color:"]
    dataset = Dataset.from_dict({"prompt": prompts * 8})
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=REWARDS[args.reward],
        args=GRPOConfig(**train),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    attach(trainer, config)
    trainer.train()
    merged = sorted(p.name for p in (Path(config.store) / "merged").iterdir())
    print(f"agent {config.agent}: {trainer.state.global_step} steps; merged models: {merged}")


if __name__ == "__main__":
    main()
