"""The demo's base model: a tiny Qwen2 built from a config, warmed up by brief SFT.

RL needs a policy that sometimes succeeds: GRPO learns only from groups whose completions differ
in reward. A randomly initialised model never emits ``call:weather(city=paris)``, so the built
base is first fine-tuned (teacher forcing, loss on the answer only) on the training split of
every task, briefly enough that it stays far from saturated. It is saved in bfloat16, the dtype
of every checkpoint the agents write, and cached: a rerun with the same settings reuses it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ram_trl.demo.tasks import Split
from ram_trl.io import atomic_directory

STAMP = "ram_trl_demo_base.json"


def pretrain(
    folder: Path, splits: list[Split], settings: dict[str, Any], *, progress: bool = True
) -> Path:
    """The SFT'd base at ``folder``: reused when it was built with the same ``settings``
    (``hidden_size``, ``layers``, ``sft_*``, ``seed``), else built and published atomically."""
    stamp = folder / STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)  # built with other settings: the demo's own output, rebuilt
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from ram_trl.testing import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(
        hidden_size=settings["hidden_size"],
        layers=settings["layers"],
        intermediate_size=4 * settings["hidden_size"],
        seed=settings["seed"],
    ).train()
    pools = [list(zip(split.prompts, split.answers, strict=True)) for split in splits]
    rng = random.Random(f"sft-{settings['seed']}")
    torch.manual_seed(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["sft_lr"], weight_decay=0.0)
    bar = tqdm(range(settings["sft_steps"]), desc="SFT of the base", disable=not progress)
    for _ in bar:
        # every task equally often, whatever the size of its split
        batch = [rng.choice(rng.choice(pools)) for _ in range(settings["sft_batch_size"])]
        input_ids, labels = _encode(tokenizer, batch)
        loss = model(input_ids=input_ids, attention_mask=input_ids.ne(0), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model = model.eval().to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=1, pad_token_id=0)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(settings, indent=1))
    return folder


def _encode(tokenizer: Any, batch: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + eos`` ids, with labels only on ``answer + eos``."""
    rows, targets = [], []
    for prompt, answer in batch:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        targets.append([-100] * len(p) + a)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([t + [-100] * (width - len(t)) for t in targets])
    return input_ids, labels


def bf16_copy(model: Path, folder: Path) -> Path:
    """``model`` (a user's ``--model`` folder) as the demo's base: itself when it is stored in
    bfloat16, else a bfloat16 copy at ``folder`` (cached). The agents' checkpoints are bf16, and a
    task vector against a float32 base would count the base's own rounding as change."""
    from ram_trl.io import ModelFolder

    with ModelFolder(model) as source:
        floats = {i.dtype for i in source.tensors.values() if i.dtype.is_floating_point}
    if floats == {torch.bfloat16}:
        return model
    stamp = {"source": str(model.resolve()), "dtype": "bfloat16"}
    if (folder / STAMP).is_file() and json.loads((folder / STAMP).read_text()) == stamp:
        return folder
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_directory(folder) as tmp:
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(model).save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
    return folder
