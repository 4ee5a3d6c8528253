"""The ``ram-trl`` command line: ``merge``, ``probe``, ``methods`` (and ``snapshot``/``store``).

Imports stay lean (no torch, no transformers) until a command runs, so ``--help`` is instant and
start-up does not eat into merge time.
"""

from __future__ import annotations

import argparse
import sys
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


def _add_inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="the base model folder (Hugging Face, safetensors)")
    parser.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an agent fine-tuned from the base; repeat for each agent",
    )
    parser.add_argument("--method", help="merge method (see `ram-trl methods`), default ram_plus")
    for name, kind, text in PARAM_FLAGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    parser.add_argument("--device", help="where the arithmetic runs: cpu (default) or cuda")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from ram_trl import __version__

    parser = argparse.ArgumentParser(
        prog="ram-trl", description="Reinforced Agent Merging (RAM/RAM+) for RL-trained agents."
    )
    parser.add_argument("--version", action="version", version=f"ram-trl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser(
        "merge", help="merge agents into one model", description="Merge agents into one model."
    )
    merge.add_argument("recipe", nargs="?", help="a YAML recipe; flags given here override it")
    _add_inputs(merge)
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
        "--dry-run", action="store_true", help="validate every input and print the plan only"
    )
    merge.set_defaults(func=run_merge)

    probe = commands.add_parser(
        "probe", help="sparsity and overlap statistics of the agents (paper Fig. 2)"
    )
    _add_inputs(probe)
    probe.add_argument("--out", help="folder for probe.json and probe.png")
    probe.set_defaults(func=run_probe)

    methods = commands.add_parser("methods", help="list the merge methods and their parameters")
    methods.set_defaults(func=run_methods)

    try:
        from ram_trl.snapshot.cli import add_subcommands
    except ImportError:  # the snapshot store is optional for the merge engine
        pass
    else:
        add_subcommands(commands)
    return parser


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


def _params(args: argparse.Namespace) -> dict[str, Any]:
    return {
        name: getattr(args, name) for name, *_ in PARAM_FLAGS if getattr(args, name) is not None
    }


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
    params = _params(args)
    scope = params.pop("rho_scope", None)
    config.parameters = {**config.parameters, **params}
    config.rho_scope = scope or config.rho_scope
    for name in ("method", "device", "out", "dtype", "shard_size", "overwrite"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(config, name, value)
    return config


def run_merge(args: argparse.Namespace) -> int:
    config = _config(args)
    report = config.run(dry_run=args.dry_run, progress=not args.quiet)
    _print_agents(report)
    if args.dry_run:
        print(f"dry run: {len(report.agents)} agent(s) and the base are valid; nothing written")
        print(f"plan: {report.method} {report.params} -> {config.out or '(no --out given)'}")
    else:
        seconds = report.seconds.get("total", 0.0)
        print(f"merged into {report.out} ({len(report.files)} file(s)) in {seconds:.1f} s")
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ram_trl.errors import InputError
    from ram_trl.probe import probe, save_plot

    if not args.base:
        raise InputError("--base is required")
    params = _params(args)
    report = probe(
        args.base,
        parse_agents(args.agent),
        args.method or "ram_plus",
        params=params,
        device=args.device or "cpu",
        progress=not args.quiet,
    )
    print(report.table())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report.save_json(out / "probe.json")
        plotted = save_plot(report, out / "probe.png")
        print(f"wrote {out / 'probe.json'}" + (f" and {out / 'probe.png'}" if plotted else ""))
    return 0


def run_methods(args: argparse.Namespace) -> int:
    import dataclasses

    from ram_trl.methods import METHODS

    for method in METHODS.values():
        fields = ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(method.params))
        print(f"{method.name:16} {method.summary}\n{'':16} parameters: {fields or 'none'}")
    return 0


def _print_agents(report) -> None:
    if not any(a.changed for a in report.agents):
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


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks in the heap instead of returning them to the kernel.

    A merge allocates and frees the same few chunk-sized float32 buffers thousands of times;
    by default glibc unmaps each one and the next is page-faulted in afresh (about 20 ms per
    32 MiB on a small VM). Reusing them makes merging 2-3x faster, and peak memory stays that of
    the few live chunks. Process-wide, so only the ``ram-trl`` command does it, never the library
    inside a user's process. Returns False where glibc's ``mallopt`` is not available.
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 1 << 30) == 1
    return mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok


def main(argv: Sequence[str] | None = None) -> int:
    from ram_trl.errors import RAMError

    args = build_parser().parse_args(argv)
    if argv is None:  # the ram-trl process itself, not a caller's
        keep_freed_memory()
    try:
        return args.func(args)
    except RAMError as error:
        print(f"ram-trl: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
