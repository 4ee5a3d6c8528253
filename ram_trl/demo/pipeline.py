"""``ram-trl demo`` end to end: RL agents in, one generalist out, measured.

1. Seeded, disjoint train / validation / test splits of every task.
2. The base: built and briefly SFT'd (cached in ``<out>/base``), or ``--model``.
3. One GRPO specialist per task (``trl.GRPOTrainer`` + ``RAMCallback``, one shared store, two
   processes at a time, so the callback's merges combine agents that are still training), and
   the joint-RL baseline: one GRPO run on the mixture with as many steps as all of them.
4. Final merges of the store's last snapshots: RAM, RAM+ and RAM+s at the paper's defaults, and
   the baselines tuned by :func:`ram_trl.search` on the validation split, as is ``ram_plus (r
   tuned)``; every model scored greedily on the same test prompts.
5. The table (printed and ``results.json``), ``results.png`` and the probe figure ``probe.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ram_trl.demo import runs
from ram_trl.demo.config import DemoConfig
from ram_trl.demo.pretrain import bf16_copy, pretrain
from ram_trl.demo.report import Results, Row
from ram_trl.demo.tasks import TASKS, Split, splits
from ram_trl.evaluation import EvalTask, GenerationSettings, score_folder
from ram_trl.merging.search import Candidate, grid, search


def make_splits(config: DemoConfig) -> dict[str, dict[str, Split]]:
    """Per task, disjoint test / val / train splits; test is dealt first, so the test prompts
    do not depend on the other sizes. A task with few distinct prompts (tool calls) trains on
    what the held-out splits leave."""
    out = {}
    for task in config.tasks:
        available = len(TASKS[task].enumerate()) if TASKS[task].enumerate else None
        held_out = config.test_prompts + config.val_prompts
        train = config.train_prompts
        if available is not None:
            train = min(train, available - held_out)
        out[task] = splits(
            task,
            {"test": config.test_prompts, "val": config.val_prompts, "train": train},
            config.seed,
        )
    return out


def eval_tasks(data: dict[str, dict[str, Split]], split: str) -> list[EvalTask]:
    return [
        EvalTask(t, data[t][split].prompts, TASKS[t].reward, {"answer": data[t][split].answers})
        for t in data
    ]


def generation(tasks: list[str]) -> GenerationSettings:
    """Greedy, long enough for the longest answer of any task (plus end of sequence)."""
    return GenerationSettings(
        batch_size=64, max_new_tokens=max(TASKS[t].max_completion_tokens for t in tasks)
    )


def candidates(config: DemoConfig) -> dict[str, list[Candidate]]:
    """Table row -> the settings tried on validation (one: the method's paper default)."""
    scales = config.scale_grid
    return {
        "ram": [Candidate("ram")],
        "ram_plus": [Candidate("ram_plus", {"r": 0.1, "alpha": 2.0})],
        "ram_plus_s": [Candidate("ram_plus_s", {"r": 0.1})],
        "ram_plus (r tuned)": grid("ram_plus", r=config.r_grid, alpha=[2.0]),
        "task_arithmetic": grid("task_arithmetic", scale=scales),
        "ties": grid("ties", keep=config.keep_grid, scale=scales),
        "dare_linear": grid("dare_linear", drop=config.drop_grid, scale=scales),
        "dare_ties": grid("dare_ties", drop=config.drop_grid, scale=scales),
    }


def run(config: DemoConfig, *, progress: bool = True) -> Results:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    data = make_splits(config)
    settings = generation(config.tasks)
    test, val = eval_tasks(data, "test"), eval_tasks(data, "val")

    # -- the base ----------------------------------------------------------------------------
    if config.model is not None:
        base = bf16_copy(Path(config.model), out / "base")
    else:
        stamp = {
            k: getattr(config, k)
            for k in ("hidden_size", "layers", "sft_steps", "sft_lr", "sft_batch_size", "seed")
        }
        stamp["tasks"] = config.tasks
        base = pretrain(
            out / "base", [data[t]["train"] for t in config.tasks], stamp, progress=progress
        )
    seconds["base"] = time.perf_counter() - clock

    # -- RL: specialists with RAMCallback, then the joint baseline -----------------------------
    clock = time.perf_counter()
    import shutil

    for stale in ("store", "agents", "joint", "merged"):
        shutil.rmtree(out / stale, ignore_errors=True)
    specs = [runs.agent_spec(config, t, base, data) for t in config.tasks]
    specs.append(runs.joint_spec(config, base, data))
    runs.run_concurrently(specs, config.concurrency, progress=progress)
    seconds["rl"] = time.perf_counter() - clock

    # -- the table: every model on the test split; merges tuned on validation -----------------
    from tqdm.auto import tqdm

    clock = time.perf_counter()
    models = {"base": ("base", base)}
    models.update({t: ("specialist", out / "agents" / t / "final") for t in config.tasks})
    models["joint RL"] = ("joint", out / "joint" / "final")
    rows = [
        Row(name, kind, score_folder(path, test, settings, device=config.device))
        for name, (kind, path) in tqdm(models.items(), desc="test evaluation", disable=not progress)
    ]
    seconds["evaluation"] = time.perf_counter() - clock
    clock = time.perf_counter()
    agents = _store_agents(out / "store", base, config.tasks)
    tried_by_row = candidates(config)
    bar = tqdm(total=sum(map(len, tried_by_row.values())), desc="merges", disable=not progress)
    for label, tried in tried_by_row.items():
        bar.set_postfix_str(label)
        ranked = search(base, agents, tried, val, generation=settings, device=config.device,
                        out=out / "merged" / _folder_name(label), progress=False)  # fmt: skip
        bar.update(len(tried))
        best = ranked[0]
        params = ", ".join(f"{k}={v}" for k, v in best.candidate.params.items())
        setting = params if len(tried) > 1 else "paper default"
        scores = score_folder(best.path, test, settings, device=config.device)
        rows.append(Row(label, "merge", scores, setting=setting, validation=best.score))
    bar.close()
    seconds["merges"] = time.perf_counter() - clock

    from ram_trl import probe
    from ram_trl.probing import save_plot

    report = probe(base, {t: out / "agents" / t / "final" for t in config.tasks}, progress=False)
    save_plot(report, out / "probe.png")
    density = {
        a.name: {
            "density": a.changed / a.total,
            "unique_share": a.unique / a.changed if a.changed else 0.0,
            "shared_share": a.shared / a.changed if a.changed else 0.0,
        }
        for a in report.agents
    }
    results = Results(
        tasks=config.tasks,
        rows=rows,
        agents=density,
        during_training=_during_training(out, config.tasks),
        config=config.to_dict(),
        seconds=seconds,
    )
    results.add_retention()
    results.save(out)
    return results


def _folder_name(label: str) -> str:
    """``ram_plus (r tuned)`` -> ``ram_plus_r_tuned``."""
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def _store_agents(store: Path, base: Path, tasks: list[str]) -> dict[str, Any]:
    """Every agent's last snapshot in the store, as weight sources over ``base``."""
    from ram_trl.snapshot import SnapshotStore, TaskVectorSource

    snapshots = SnapshotStore(store)
    refs = {t: snapshots.latest(t) for t in tasks}
    return {t: TaskVectorSource(ref.path, base) for t, ref in refs.items() if ref is not None}


def _during_training(out: Path, tasks: list[str]) -> list[dict[str, Any]]:
    """The callback's merged evaluations, as each agent's trainer logged them."""
    events = []
    for task in tasks:
        log = out / "agents" / task / "log.json"
        if not log.is_file():
            continue
        for entry in json.loads(log.read_text()):
            merged = {
                k.split("/")[1]: v
                for k, v in entry.items()
                if k.startswith("eval_merged/") and k.endswith("/reward")
            }
            if merged:
                inputs = sorted(k.split("/")[2] for k in entry if k.startswith("ram/lambda/"))
                events.append(
                    {
                        "agent": task,
                        "step": entry.get("step"),
                        "merged": inputs,
                        "eval_merged": merged,
                    }
                )
    return events
