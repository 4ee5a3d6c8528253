"""Building the demo's runs and running them as concurrent processes, one bar each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ram_trl.demo.agent import RunSpec
from ram_trl.demo.config import DemoConfig
from ram_trl.demo.tasks import TASKS, Split
from ram_trl.errors import RAMError


def grpo_settings(config: DemoConfig, tasks: list[str], steps: int) -> dict[str, Any]:
    """The ``trl.GRPOConfig`` fields of a run on ``tasks`` (the same for every run but steps)."""
    return {
        "max_steps": steps,
        "save_steps": config.save_steps,
        "learning_rate": config.learning_rate,
        "optim": config.optim,
        "adam_epsilon": config.adam_epsilon,
        "beta": config.beta,
        "num_generations": config.num_generations,
        "per_device_train_batch_size": config.num_generations * config.prompts_per_step,
        "max_completion_length": max(TASKS[t].max_completion_tokens for t in tasks),
        "temperature": config.temperature,
        "seed": config.seed,
        "use_cpu": config.device == "cpu",  # float32 training either way; bf16 checkpoints
    }


def _columns(splits: list[Split]) -> dict[str, list[str]]:
    return {
        "prompt": [p for s in splits for p in s.prompts],
        "answer": [a for s in splits for a in s.answers],
        "task": [s.task for s in splits for _ in s.prompts],
    }


def agent_spec(
    config: DemoConfig, task: str, base: Path, splits: dict[str, dict[str, Split]]
) -> RunSpec:
    """A specialist: GRPO on ``task`` with a RAMCallback into the shared store."""
    out = Path(config.out)
    merged_eval = {
        t: {
            "prompt": splits[t]["val"].prompts[: config.merged_eval_prompts],
            "answer": splits[t]["val"].answers[: config.merged_eval_prompts],
        }
        for t in config.tasks
    }
    return RunSpec(
        name=task,
        tasks=[task],
        base=str(base),
        out=str(out / "agents" / task),
        train=_columns([splits[task]["train"]]),
        grpo=grpo_settings(config, [task], config.grpo_steps),
        store=str(out / "store"),
        merged_eval=merged_eval,
    )


def joint_spec(config: DemoConfig, base: Path, splits: dict[str, dict[str, Split]]) -> RunSpec:
    """The joint-RL baseline: one GRPO run on the mixture of every task, as many steps as all
    the specialists together."""
    steps = config.grpo_steps * len(config.tasks)
    return RunSpec(
        name="joint",
        tasks=config.tasks,
        base=str(base),
        out=str(Path(config.out) / "joint"),
        train=_columns([splits[t]["train"] for t in config.tasks]),
        grpo=grpo_settings(config, config.tasks, steps),
    )


def run_concurrently(specs: list[RunSpec], concurrency: int, *, progress: bool = True) -> None:
    """Run every spec in its own process, ``concurrency`` at a time, in the order given; one
    progress bar per run. A failed run stops the others and raises with its log's tail."""
    from tqdm.auto import tqdm

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    queue = list(specs)
    running: list[tuple[RunSpec, subprocess.Popen, Any, Any]] = []
    bars = {
        s.name: tqdm(
            total=s.grpo["max_steps"],
            desc=f"GRPO {s.name}",
            position=i,
            leave=True,
            disable=not progress,
        )
        for i, s in enumerate(specs)
    }
    try:
        while queue or running:
            while queue and len(running) < concurrency:
                spec = queue.pop(0)
                out = Path(spec.out)
                out.mkdir(parents=True, exist_ok=True)
                (out / "progress.json").unlink(missing_ok=True)
                path = spec.save(out / "spec.json")
                log = open(out / "run.log", "w")  # noqa: SIM115 - closed when the run ends
                cmd = [sys.executable, "-m", "ram_trl.demo.agent", str(path)]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((spec, proc, log, time.perf_counter()))
            time.sleep(0.5)
            for item in list(running):
                spec, proc, log, started = item
                _update(bars[spec.name], Path(spec.out) / "progress.json")
                if proc.poll() is None:
                    continue
                log.close()
                running.remove(item)
                if proc.returncode != 0:
                    tail = (Path(spec.out) / "run.log").read_text().splitlines()[-15:]
                    raise RAMError(f"the GRPO run {spec.name!r} failed:\n" + "\n".join(tail))
                (Path(spec.out) / "seconds.json").write_text(
                    json.dumps(time.perf_counter() - started)
                )
    finally:
        for _, proc, log, _ in running:
            proc.kill()
            log.close()
        for bar in bars.values():
            bar.close()


def _update(bar: Any, path: Path) -> None:
    try:
        step = json.loads(path.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return
    bar.update(step - bar.n)
