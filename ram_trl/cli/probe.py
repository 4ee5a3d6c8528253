"""``ram-trl probe``: sparsity and overlap statistics of the agents (the paper's Fig. 2)."""

from __future__ import annotations

import argparse
from typing import Any

from ram_trl.cli.merge import add_inputs, method_params, parse_agents


def add_parser(subparsers: Any) -> None:
    """Register ``probe``."""
    probe = subparsers.add_parser(
        "probe", help="sparsity and overlap statistics of the agents (paper Fig. 2)"
    )
    add_inputs(probe)
    probe.add_argument("--out", help="folder for probe.json and probe.png")
    probe.set_defaults(func=run_probe)


def run_probe(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ram_trl.errors import InputError
    from ram_trl.merging.inputs import check_output_disjoint, input_paths
    from ram_trl.probing import probe, save_plot

    if not args.base:
        raise InputError("--base is required")
    agents = parse_agents(args.agent)
    out = Path(args.out) if args.out else None
    if out is not None:  # refused before the (long) computation, not after it
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder")
        check_output_disjoint(out, input_paths(args.base, agents))
    method = args.method or "ram_plus"
    report = probe(
        args.base,
        agents,
        method,
        params=method_params(args, method),
        device=args.device or "cpu",
        progress=not args.quiet,
    )
    print(report.table())
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
            report.save_json(out / "probe.json")
            plotted = save_plot(report, out / "probe.png")
        except OSError as e:
            from ram_trl.errors import OutputError, describe_os_error

            raise OutputError(f"cannot write to {out}: {describe_os_error(e)}") from None
        print(f"wrote {out / 'probe.json'}" + (f" and {out / 'probe.png'}" if plotted else ""))
    return 0
