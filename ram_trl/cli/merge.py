"""``ram-trl merge`` and ``ram-trl methods``; the flags every merge-like command shares.

Method parameters come from the flags of ``PARAM_FLAGS`` or, for any parameter of any
registered method, ``--param NAME=VALUE`` (typed by the method's parameter dataclass).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

#: method-parameter flags: (flag, type, help); each is passed on only when given
PARAM_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("r", float, "RAM+ rescaling strength (default 0.1; arm_r_v2: 1.1)"),
    ("alpha", float, "RAM+ cap on rho (default 2.0)"),
    ("epsilon", float, "change threshold: |tau| > epsilon counts as changed (default 1e-5)"),
    ("rho_scope", str, "count rho over the whole model (global, the paper) or per tensor"),
    ("scale", float, "task_arithmetic / ties / dare: scale of the merged delta (default 1.0)"),
    ("keep", float, "ties: fraction of each task vector kept per tensor (default 0.2)"),
    ("drop", float, "dare: drop probability p (default 0.9)"),
    ("seed", int, "dare: random seed (default 0)"),
)


def add_inputs(parser: argparse.ArgumentParser) -> None:
    """--base, --agent, --method, the method's parameters, --device, --quiet."""
    parser.add_argument("--base", help="the base model folder (Hugging Face, safetensors)")
    repeated = {
        "--agent": ("NAME=PATH", "an agent fine-tuned from the base; repeat for each agent"),
        "--param": ("NAME=VALUE", "any parameter of the method, e.g. --param density=0.9"),
    }
    for flag, (metavar, text) in repeated.items():
        parser.add_argument(flag, action="append", default=[], metavar=metavar, help=text)
    parser.add_argument("--method", help="merge method (see `ram-trl methods`), default ram_plus")
    for name, kind, text in PARAM_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    parser.add_argument("--device", help="where the arithmetic runs: cpu (default) or cuda")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers: Any) -> None:
    """Register ``merge`` and ``methods``."""
    merge = subparsers.add_parser(
        "merge", help="merge agents into one model", description="Merge agents into one model."
    )
    merge.add_argument("recipe", nargs="?", help="a YAML recipe; flags given here override it")
    add_inputs(merge)
    merge.add_argument(
        "--store",
        help="merge snapshots of a store (ram-trl snapshot / RAMCallback); --agent then takes "
        "NAME or NAME@STEP, and no --agent means every agent's newest snapshot",
    )
    merge.add_argument("--out", help="output folder (written atomically)")
    merge.add_argument("--dtype", help="output dtype (default: the base's)")
    merge.add_argument("--shard-size", help="largest output shard, e.g. 5GB (default) or 500MB")
    merge.add_argument("--overwrite", action="store_true", default=None, help="replace --out")
    merge.add_argument(
        "--output",
        choices=("model", "lora"),
        help="a full model folder (default) or a LoRA adapter",
    )
    merge.add_argument(
        "--lora-rank",
        help="rank of a LoRA output (default 16), or 'auto': per module the "
        "smallest within --lora-max-error",
    )
    merge.add_argument(
        "--lora-max-error",
        type=float,
        help="largest relative error of a LoRA output (auto "
        "rank: the target; a fixed rank: warned about above it; default 0.1 with auto)",
    )
    merge.add_argument(
        "--dry-run", action="store_true", help="validate every input and print the plan only"
    )
    merge.set_defaults(func=run_merge)

    methods = subparsers.add_parser("methods", help="list the merge methods and their parameters")
    methods.set_defaults(func=run_methods)


def parse_agents(specs: Sequence[str]) -> dict[str, str]:
    from ram_trl.errors import InputError

    agents: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--agent {spec!r}: expected NAME=PATH")
        if name in agents:
            raise InputError(f"--agent {name!r} is given twice")
        agents[name] = path
    return agents


def method_params(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The method parameters given on the command line: flags, then ``--param`` pairs."""
    params = {
        name: getattr(args, name) for name, *_ in PARAM_FLAGS if getattr(args, name) is not None
    }
    return {**params, **_typed_params(method, args.param)}


def _typed_params(method: str, items: Sequence[str]) -> dict[str, Any]:
    import dataclasses

    from ram_trl.errors import InputError
    from ram_trl.methods import get_method

    if not items:
        return {}
    fields = {f.name: f for f in dataclasses.fields(get_method(method).params)}
    params: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise InputError(f"--param {item!r}: expected NAME=VALUE")
        field = fields.get(name)  # an unknown name is refused, by name, with the known ones
        kind = type(field.default) if field is not None else str
        try:
            params[name] = kind(text) if kind is not bool else text.lower() in ("1", "true")
        except ValueError:
            raise InputError(f"--param {item!r}: {name} takes a {kind.__name__}") from None
    return params


def _config(args: argparse.Namespace):
    from ram_trl.errors import InputError
    from ram_trl.merging.config import MergeConfig

    config = MergeConfig.from_yaml(args.recipe) if args.recipe else None
    store = getattr(args, "store", None) or (config.store if config else None)
    agents: dict[str, str] | list[str] = list(args.agent) if store else parse_agents(args.agent)
    if config is None:
        if not args.base and not store:
            raise InputError("give a recipe, --base or --store (see `ram-trl merge --help`)")
        config = MergeConfig(base=args.base, agents=agents, store=store)
    else:
        config.base = args.base or config.base
        config.agents = agents or config.agents
        config.store = store
    names = (
        "method",
        "device",
        "out",
        "dtype",
        "shard_size",
        "overwrite",
        "output",
        "lora_rank",
        "lora_max_error",
    )
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    params = method_params(args, config.method)
    scope = params.pop("rho_scope", None)
    config.parameters = {**config.parameters, **params}
    config.rho_scope = scope or config.rho_scope
    return config


def run_merge(args: argparse.Namespace) -> int:
    """One merge; under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) split across
    the ranks (a process group is started when none is up), rank 0 printing the outcome."""
    import os

    import torch

    from ram_trl.merging.split import Split, init_from_env

    config = _config(args)
    if "OMP_NUM_THREADS" not in os.environ:
        # This process is the merge's: its own threads (RAM_TRL_THREADS) use the cores, and
        # torch's intra-op threads on top of them only oversubscribe them (a store merge of the
        # 0.5B benchmark on 2 cores took 0.84x the wall time with one intra-op thread).
        torch.set_num_threads(1)
    started = init_from_env(config.device)
    try:
        split = Split.from_torch()
        report = config.run(dry_run=args.dry_run, progress=not args.quiet, split=split)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    if not split.is_main:
        return 0
    print_agents(report)
    if args.dry_run:
        print(f"dry run: {len(report.agents)} agent(s) and the base are valid; nothing written")
        print(f"plan: {report.method} {report.params} -> {config.out or '(no --out given)'}")
    else:
        seconds = report.seconds.get("total", 0.0)
        print(f"merged into {report.out} ({len(report.files)} file(s)) in {seconds:.1f} s")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from ram_trl.methods import METHODS

    for method in METHODS.values():
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(method.params))
        print(f"{method.name:16} {method.summary}\n{'':16} parameters: {fields or 'none'}")
    return 0


def print_agents(report) -> None:
    """The per-agent table of a report whose changes were counted."""
    if not report.counted:
        return
    print(f"{'agent':12} {'changed':>9} {'unique':>9} {'shared':>9} {'rho':>8} {'lambda':>8}")
    for a in report.agents:
        rho = "-" if a.rho is None else f"{a.rho:.3g}"
        unique = a.unique / max(1, a.changed)
        shared = a.shared / max(1, a.changed)
        print(
            f"{a.name:12} {a.changed_fraction:9.2%} {unique:9.2%} {shared:9.2%} "
            f"{rho:>8} {a.lambda_:8.4f}"
        )
