"""``ram-trl watch STORE``: merge a store's newest snapshots whenever they change (and optionally
evaluate each merged model), so that training jobs with ``merge: watcher`` only snapshot."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``watch``."""
    p = subparsers.add_parser(
        "watch",
        help="merge a store whenever new snapshots land (a merge service beside the jobs)",
        description="Poll STORE and merge the newest snapshot of every agent whenever that set "
        "changes, into merged/merge-<N>/ (merged/latest points at the newest). A state any job "
        "merged already is reused. Prints one JSON line per merged model; Ctrl-C stops.",
    )
    p.add_argument("store")
    p.add_argument("--method", default="ram_plus", help="merge method (default ram_plus)")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the method, e.g. --param r=0.2",
    )
    p.add_argument("--dtype", help="output dtype (default: the base's)")
    p.add_argument(
        "--output",
        choices=("model", "lora"),
        default="model",
        help="a full model folder (default) or a LoRA adapter",
    )
    p.add_argument("--lora-rank", default="16", help="rank of a LoRA output (default 16) or 'auto'")
    p.add_argument(
        "--lora-max-error",
        type=float,
        default=0.1,
        help="largest relative error of a LoRA output (default 0.1)",
    )
    p.add_argument("--min-agents", type=int, default=2, help="merge from this many agents on")
    p.add_argument("--keep-last-merged", type=int, help="keep only the newest N merged models")
    p.add_argument(
        "--eval",
        metavar="RECIPE",
        help="YAML with eval_tasks (and eval_* generation fields) to score each merge",
    )
    p.add_argument("--device", default="cpu", help="where evaluation runs (default cpu)")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between polls (default 5)")
    p.add_argument(
        "--idle-exit",
        type=float,
        metavar="SECONDS",
        help="stop after this long without new snapshots (default: run until Ctrl-C)",
    )
    p.add_argument("--max-merges", type=int, help="stop after this many merged models")
    p.set_defaults(func=run_watch)


def run_watch(args: argparse.Namespace) -> int:
    from ram_trl.cli.merge import _typed_params
    from ram_trl.errors import InputError
    from ram_trl.snapshot import SnapshotStore
    from ram_trl.training.jobs import MergeSettings
    from ram_trl.training.watch import EvalRecipe, watch

    rank = int(args.lora_rank) if args.lora_rank.isdigit() else args.lora_rank
    if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
        raise InputError(f"--lora-rank must be an integer >= 1 or 'auto', got {args.lora_rank!r}")
    for name in ("min_agents", "keep_last_merged", "max_merges"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    settings = MergeSettings(
        method=args.method,
        params=_typed_params(args.method, args.param),
        dtype=args.dtype,
        output=args.output,
        lora_rank=rank,
        lora_max_error=args.lora_max_error,
        min_agents=args.min_agents,
    )
    settings.identity()  # an unknown method or parameter is refused now, not at the first merge
    store = SnapshotStore(args.store, create=False)
    recipe = EvalRecipe.from_yaml(args.eval) if args.eval else None
    outcomes = watch(
        store,
        settings,
        recipe=recipe,
        interval=args.interval,
        idle_exit=args.idle_exit,
        max_merges=args.max_merges,
        keep_last_merged=args.keep_last_merged,
        device=args.device,
    )
    print(f"watched {store.root}: {len(outcomes)} merged model(s)", flush=True)
    return 0
