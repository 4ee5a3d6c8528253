"""How long RAMCallback pauses training, per merge mode, with concurrent GRPO agents.

    .venv/bin/python benchmarks/callback_bench.py                  # 3 agents, ~20M params
    .venv/bin/python benchmarks/callback_bench.py --modes background,watcher --steps 40

For each mode (``self``: merge in process at every save; ``background``: in a subprocess;
``watcher``: the jobs only snapshot and one ``ram-trl watch`` merges; ``never``: snapshots
only, the floor; ``sync``: snapshots only, written in the training path, as before background
snapshots), ``--agents`` real ``trl.GRPOTrainer`` jobs train at the same time into one
fresh store, each saving every ``--save-steps``. Every job times the callback's hooks itself:
the time spent inside ``on_step_end`` / ``on_save`` is the pause in the training path;
``on_train_end`` (the final snapshot, and waiting for or making the final merge) comes after
training; every wait for a previous background snapshot happens inside those hooks, so it is
counted in the pause. The table
(markdown, stdout) gives, per agent, training time, the pause and its share of training time,
the train-end time, the total (training + train end: whether background work only moved the
cost), and how many merged models the store holds; the target is a pause of at
most 5% with background or watcher merges. Timings on a shared machine are inflated by its
load: the script prints ``os.getloadavg()`` before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("self", "background", "watcher", "never", "sync")
AGENTS = ("digits", "letters", "symbols")
PROMPTS = ["1+1=", "2*3=", "say hi:", "abc", "name a color:", "(2", "9-5=", "3*"]
TARGET = 0.05


def reward(kind: str):
    keep = {"digits": str.isdigit, "letters": str.isalpha, "symbols": lambda c: c in "+-*/()="}[
        kind
    ]

    def score(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        return [sum(map(keep, c)) / max(1, len(c)) for c in completions]

    score.__name__ = kind
    return score


# -- one agent's job (a child process) ---------------------------------------------------------


def run_agent(args: argparse.Namespace) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from ram_trl import RAMCallback, RAMConfig

    class TimedCallback(RAMCallback):
        """RAMCallback, timing its own hooks."""

        seconds: dict[str, float] = {"on_step_end": 0.0, "on_save": 0.0, "on_train_end": 0.0}

        def _timed(self, hook: str, *a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return getattr(super(), hook)(*a, **kw)
            finally:
                self.seconds[hook] += time.perf_counter() - started

        def on_step_end(self, *a: Any, **kw: Any) -> Any:
            return self._timed("on_step_end", *a, **kw)

        def on_save(self, *a: Any, **kw: Any) -> Any:
            return self._timed("on_save", *a, **kw)

        def on_train_end(self, *a: Any, **kw: Any) -> Any:
            return self._timed("on_train_end", *a, **kw)

    work = Path(args.workdir)
    config = GRPOConfig(
        output_dir=str(work / args.mode / args.agent),
        use_cpu=True,
        bf16=False,
        max_steps=args.steps,
        save_steps=args.save_steps,
        save_only_model=True,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        learning_rate=1e-5,
        report_to=[],
        logging_steps=args.steps,
        gradient_checkpointing=False,
        seed=AGENTS.index(args.agent),
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(work / "base"),
        reward_funcs=reward(args.agent),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * args.steps}),
        processing_class=AutoTokenizer.from_pretrained(work / "base"),
    )
    merge = {"background": "self", "sync": "never"}.get(args.mode, args.mode)
    ram = RAMConfig(
        store=str(work / args.mode / "store"),
        agent=args.agent,
        base=str(work / "base"),
        merge=merge,
        merge_background=args.mode == "background",
        keep_last=2,
        snapshot_background=False if args.mode == "sync" else None,
    )
    callback = TimedCallback(trainer, ram)
    trainer.add_callback(callback)
    started = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - started
    end = callback.seconds["on_train_end"]
    result = {
        "agent": args.agent,
        "mode": args.mode,
        "train_seconds": total - end,
        "pause_seconds": callback.seconds["on_step_end"] + callback.seconds["on_save"],
        "train_end_seconds": end,
        "saves": args.steps // args.save_steps,
    }
    (work / args.mode / f"{args.agent}.json").write_text(json.dumps(result))


# -- the driver --------------------------------------------------------------------------------


def _interruptible() -> None:
    """SIGINT stops the watcher even when this script runs in the background of a shell (which
    starts it with SIGINT ignored, and a child inherits that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_mode(args: argparse.Namespace, mode: str) -> tuple[list[dict[str, Any]], int]:
    import shutil

    from ram_trl.snapshot import SnapshotStore

    folder = Path(args.workdir) / mode
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    store = SnapshotStore(folder / "store")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    watcher = None
    if mode == "watcher":
        watcher = subprocess.Popen(
            [sys.executable, "-m", "ram_trl", "watch", str(store.root), "--interval", "1"],
            env=env,
            preexec_fn=_interruptible,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    names = AGENTS[: args.agents]
    started = time.perf_counter()
    common = [
        "--workdir",
        args.workdir,
        "--mode",
        mode,
        "--steps",
        str(args.steps),
        "--save-steps",
        str(args.save_steps),
    ]
    jobs = [
        subprocess.Popen(
            [sys.executable, __file__, "--agent", name, *common],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in names
    ]
    for job in jobs:
        out = job.communicate()[0]
        if job.returncode != 0:
            sys.exit(f"an agent of mode {mode} failed:\n{out[-3000:]}")
    if watcher is not None:  # let it merge the final snapshots, then stop it
        final = {name: args.steps for name in names}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            latest = store.merged.latest()
            if latest is not None and latest.steps == final:
                break
            time.sleep(1)
        watcher.send_signal(signal.SIGINT)
        watcher.wait(timeout=60)
    rows = [json.loads((folder / f"{name}.json").read_text()) for name in names]
    wall = time.perf_counter() - started  # every job, start to end (with the watcher's last merge)
    return [{**r, "mode_wall_seconds": wall} for r in rows], len(store.merged.entries())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--agents", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=384, help="hidden size (default 384)")
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    parser.add_argument("--workdir", default="/tmp/ram-trl-callback-bench")
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--agent", help=argparse.SUPPRESS)  # the child's role
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.agent:
        run_agent(args)
        return
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        sys.exit(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    from ram_trl.testing import save_tiny_base

    base = Path(args.workdir) / "base"
    if not (base / "config.json").is_file():
        save_tiny_base(
            base,
            hidden_size=args.hidden,
            layers=args.layers,
            num_attention_heads=6,
            num_key_value_heads=2,
        )
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    params = sum(p.numel() for p in model.parameters())
    load = os.getloadavg()
    print(
        f"{args.agents} concurrent GRPO agents, {params / 1e6:.1f}M parameters, {args.steps} "
        f"steps, a save every {args.save_steps}; load average before: {load[0]:.2f}\n"
    )
    print(
        "| mode | agent | training s | pause in training s | pause share | train end s | "
        "total s | merged models |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    everything = []
    for mode in modes:
        rows, merged = run_mode(args, mode)
        for r in rows:
            share = r["pause_seconds"] / r["train_seconds"]
            print(
                f"| {mode} | {r['agent']} | {r['train_seconds']:.1f} | "
                f"{r['pause_seconds']:.2f} | {share:.1%} | {r['train_end_seconds']:.1f} | "
                f"{r['train_seconds'] + r['train_end_seconds']:.1f} | {merged} |",
                flush=True,
            )
            everything.append({**r, "merged_models": merged, "pause_share": share})
    print("\n| mode | wall s of the whole mode (all jobs, start to end) |\n|---|---:|")
    for mode in modes:
        wall = next(r["mode_wall_seconds"] for r in everything if r["mode"] == mode)
        print(f"| {mode} | {wall:.1f} |")
    load = os.getloadavg()
    print(
        f"\nload average after: {load[0]:.2f}; target: pause share <= {TARGET:.0%} with "
        "background or watcher merges"
    )
    for r in everything:
        if r["mode"] in ("background", "watcher") and r["pause_share"] > TARGET:
            print(f"ABOVE TARGET: {r['mode']} / {r['agent']}: {r['pause_share']:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=1))


if __name__ == "__main__":
    main()
