"""``ram-trl demo``: multi-agent GRPO to one generalist, on this machine, measured."""

from __future__ import annotations

import argparse
import time
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``demo``."""
    demo = subparsers.add_parser(
        "demo",
        help="train RL agents with GRPO + RAMCallback, merge them, compare (the paper's Table 1)",
        description=(
            "Builds a tiny base, SFTs it on synthetic agentic tasks, trains one GRPO agent per "
            "task (real trl.GRPOTrainer + RAMCallback, one shared store) and a joint-RL baseline, "
            "merges the agents with RAM, RAM+ and tuned baselines, and prints the test table. "
            "No downloads; about 10 minutes on 2 CPU cores (--quick: under 2)."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="the smoke-test run (under 2 minutes)")
    demo.add_argument(
        "--out", help="output folder (default runs/demo, runs/demo-quick with --quick)"
    )
    demo.add_argument("--device", choices=["cpu", "cuda"], help="where merges and evaluation run")
    demo.add_argument("--model", help="a local HF causal-LM folder to use as the base (no SFT)")
    demo.add_argument("--agents", type=int, help="number of agents/tasks, 2-4 (default 3)")
    demo.add_argument("--seed", type=int, help="seed of prompts, SFT and GRPO (default 0)")
    demo.add_argument("--config", help="a YAML recipe of DemoConfig fields (recipes/demo/)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from ram_trl.demo.config import DemoConfig
    from ram_trl.demo.pipeline import run

    overrides = {
        "out": args.out or ("runs/demo-quick" if args.quick else None),
        "device": args.device,
        "model": args.model,
        "agents": args.agents,
        "seed": args.seed,
    }
    if args.config:
        config = DemoConfig.from_yaml(args.config, quick=args.quick, **overrides)
    else:
        config = DemoConfig.preset(args.quick, **overrides)
    started = time.perf_counter()
    results = run(config, progress=not args.quiet)
    print()
    print(
        f"test reward per task (greedy, {config.test_prompts} prompts each); merges tuned on "
        f"{config.val_prompts} validation prompts per task; retention = merged / specialist score"
    )
    print(results.table())
    print()
    print("task vectors (stored bf16 vs the base; changed = |agent - base| > 1e-5):")
    for name, a in results.agents.items():
        print(
            f"  {name:<8} changed {a['density']:6.1%}   unique {a['unique_share']:6.1%}   "
            f"shared {a['shared_share']:6.1%} of its changes"
        )
    merges = len(results.during_training)
    print(f"in-training merges logged by RAMCallback: {merges} (see results.json)")
    print(f"wrote {config.out}/results.json, results.png, probe.png")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results.seconds.items())
    print(f"demo took {time.perf_counter() - started:.0f} s ({stages})")
    return 0
