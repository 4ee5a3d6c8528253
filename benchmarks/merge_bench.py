#!/usr/bin/env python
"""Benchmark ``ram-trl merge`` against the read-everything floor.

Any checkpoint merge has to read every input tensor at least once and write one output of the
base's size. This script times exactly that (the *floor*) in a fresh interpreter, then times the
whole ``ram-trl merge`` command per method the same way, and prints a markdown table with wall
time, the ratio to the floor and the peak RSS of the process tree.

The inputs are a synthetic Qwen2-shaped base and N "agents" (base + sparse perturbations with a
controlled density and overlap), generated once and cached under ``--workdir``. No model weights
are downloaded.

Usage::

    .venv/bin/python benchmarks/merge_bench.py [--params 0.5e9] [--methods ram,ram_plus]

See benchmarks/README.md for what the numbers mean and the targets. The workload is built by
``workload.py``, the floor is ``floor.py`` and the measuring is ``measure.py``; this script
runs them and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this script

from floor import (  # noqa: E402
    copy_command,
    copy_worker,
    floor_command,
    floor_worker,
    startup_command,
)
from measure import (  # noqa: E402
    DROP_CACHES,
    GIB,
    Measurement,
    cache_description,
    drop_caches_works,
    environment,
    log,
    measure,
    own_peak_rss,
    prepare_cache,
)
from workload import Workload, ensure_workload, generate_worker  # noqa: E402

SCRIPT = Path(__file__).resolve()


def method_args(spec: str) -> tuple[list[str], str]:
    """CLI arguments and a note for a ``--methods`` entry such as ``ram_plus``,
    ``ram_plus:tensor`` (method, optionally ``:rho-scope``), ``ram_plus@store`` (merging the
    agents' task-vector snapshots from a store instead of their checkpoints) or ``ram#1`` (with
    ``RAM_TRL_THREADS=1``: everything on one thread)."""
    spec, _, threads = spec.partition("#")
    spec, _, source = spec.partition("@")
    method, _, scope = spec.partition(":")
    args, notes = ["--method", method], ["from a snapshot store"] if source == "store" else []
    if method == "ram_plus" or scope:
        scope = scope or "global"
        args += ["--rho-scope", scope]
        notes.append(f"rho scope {scope}")
    if method == "ties":
        args += ["--keep", "0.2", "--scale", "1.0"]
        notes.append("keep 0.2, scale 1.0")
    elif method == "task_arithmetic":
        args += ["--scale", "1.0"]
        notes.append("scale 1.0")
    if threads:
        notes.append(f"RAM_TRL_THREADS={threads}")
    return args, ", ".join(notes)


def merge_command(
    prefix: Sequence[str], wl: Workload, spec: str, out: Path, extra: Sequence[str]
) -> list[str]:
    """The full ``ram-trl merge`` command line for one ``--methods`` entry."""
    args, _ = method_args(spec)
    threads = spec.partition("#")[2]
    env = ["env", f"RAM_TRL_THREADS={threads}"] if threads else []
    cmd = [*env, *prefix, "merge", "--base", str(wl.base)]
    if spec.partition("#")[0].endswith("@store"):
        cmd += ["--store", str(ensure_store(prefix, wl))]
    else:
        for a in wl.agents:
            cmd += ["--agent", f"{a.name}={a}"]
    return [*cmd, *args, "--out", str(out), "--overwrite", *extra]


def ensure_store(prefix: Sequence[str], wl: Workload) -> Path:
    """A snapshot store holding one ``ram-trl snapshot`` of every agent, made once per workload
    (``benchmarks/snapshot_bench.py`` times extraction itself)."""
    store = wl.root / "store"
    stamp = json.dumps(wl.stamp, sort_keys=True)
    if (store / ".bench_stamp").is_file() and (store / ".bench_stamp").read_text() == stamp:
        return store
    shutil.rmtree(store, ignore_errors=True)
    for a in wl.agents:
        cmd = [*prefix, "snapshot", "--base", str(wl.base), "--model", str(a)]
        log(f"[store] {shlex.join(cmd)}")
        args = [*cmd, "--store", str(store), "--agent", a.name, "--step", "1"]
        subprocess.run(args, check=True, stdout=sys.stderr)  # stdout carries the table
    (store / ".bench_stamp").write_text(stamp)
    return store


def _in_process(row: Row) -> float | None:
    """The best in-process time a worker printed (``in-process seconds X``), if it did."""
    found = []
    for m in row.runs:
        for line in m.stdout.read_text(errors="replace").splitlines():
            if line.startswith("in-process seconds "):
                found.append(float(line.split()[-1]))
    return min(found) if found else None


def mergekit_command(python: str, wl: Workload, method: str, out: Path) -> list[str]:
    """mergekit's ``method`` on the same base and agents, run by the interpreter ``python``
    that has mergekit installed (``--mergekit``); the config is written beside the outputs."""
    lines = [f"merge_method: {method}", f"base_model: {wl.base}", "dtype: bfloat16", "models:"]
    lines += [f"  - model: {a}" for a in wl.agents]
    config = wl.root / f"mergekit-{method}.yml"
    config.write_text("\n".join(lines) + "\n")
    return [python, "-m", "mergekit.scripts.run_yaml", str(config), str(out)]


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    method: str
    command: list[str]
    notes: str
    walls: list[float] = dataclasses.field(default_factory=list)
    runs: list[Measurement] = dataclasses.field(default_factory=list)
    error: str | None = None

    @property
    def wall_s(self) -> float:
        return min(self.walls) if self.walls else math.nan

    @property
    def peak_rss(self) -> int:
        return max((m.peak_rss for m in self.runs), default=0)


def run_row(row: Row, out: Path | None, wl: Workload, args: argparse.Namespace) -> Row:
    """Run one command ``--repeat`` times with the same cache state; keep the best wall time and
    the worst peak RSS."""
    label = out.name if out is not None else row.method
    for r in range(args.repeat):
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)  # so every run starts without an old output
        prepare_cache(args.cache, wl.input_files())
        log(f"[{row.method}] run {r + 1}/{args.repeat}: {shlex.join(row.command)}")
        m = measure(row.command, wl.root / "logs", label)
        row.runs.append(m)
        if m.returncode != 0:
            row.error = f"exit code {m.returncode}"
        elif out is not None and not any(out.rglob("*.safetensors")):
            row.error = f"exit code 0 but no *.safetensors under {out}"
        if row.error:
            return row
        row.walls.append(m.wall_s)
        log(f"[{row.method}] {m.wall_s:.2f} s, peak RSS {m.peak_rss / GIB:.2f} GiB")
    return row


def render_markdown(report: dict[str, Any]) -> str:
    """The header lines and the results table, floor first."""
    wl, env, s = report["workload"], report["environment"], report["workload"]["shape"]
    meas = wl["measured"]
    n_inputs = wl["agents"] + 1

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    lines = [
        "## ram-trl merge benchmark",
        "",
        f"- model: synthetic Qwen2, {wl['num_params']:,} params ({wl['num_params'] / 1e9:.2f}B; "
        f"{s['family']} widths: hidden {s['hidden']}, intermediate {s['intermediate']}, "
        f"{s['layers']} layers, vocab {s['vocab']}, untied lm_head), {wl['dtype']}, "
        f"{meas['bytes_per_input'] / GIB:.2f} GiB per input (generated in "
        f"{wl['gen_seconds']:.0f} s, cached between runs)",
        f"- inputs: base + {wl['agents']} agents = {n_inputs} checkpoints, "
        f"{n_inputs * meas['bytes_per_input'] / GIB:.2f} GiB read by the floor",
        f"- perturbation: target density {wl['density']}, overlap {wl['overlap']}; measured "
        f"density {mean(meas['density']):.4f}, shared share {mean(meas['shared_share']):.3f}, "
        f"global rho {mean(meas['rho']):.2f} (mean over agents)",
        f"- machine: {env['cpu_count']} CPUs ({env['cpus_usable']} usable), "
        f"{env['mem_total_gib']:.0f} GiB RAM, Python {env['python']}, torch {env['torch']}, "
        f"safetensors {env['safetensors']}, "
        f"ram-trl {env['ram_trl']} ({env['git']})",
        f"- cache: {report['cache']}",
        f"- load average (1 min) before / after the runs: {report['load_1min']['before']:.2f} / "
        f"{report['load_1min']['after']:.2f} (other processes on the machine make times noisy; "
        f"cpu s in the notes is less sensitive to that)",
        f"- timing: best of {report['repeat']}, wall clock from spawn to exit (interpreter "
        f"start-up and imports included); peak RSS = max(child ru_maxrss, sampled sum over the "
        f"process tree), worst of the repeats; ru_maxrss includes this script's own peak "
        f"({report['bench_peak_rss_mib']:.0f} MiB), which exec hands on to every child",
        "",
        "| method | wall s | x floor | peak RSS GiB | notes |",
        "|---|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"| {r['method']} | - | - | - | FAILED: {r['error']} |")
            continue
        ratio = "-" if r["x_floor"] is None else f"{r['x_floor']:.2f}"
        lines.append(
            f"| {r['method']} | {r['wall_s']:.2f} | {ratio} | {r['peak_rss_gib']:.2f} | "
            f"{r['notes']} |"
        )
    return "\n".join(lines) + "\n"


def row_to_json(row: Row, floor_wall: float) -> dict[str, Any]:
    """One results entry; the markdown table is rendered from these."""
    notes = [row.notes] if row.notes else []
    if row.runs:
        notes.append(f"cpu {row.runs[-1].cpu_s:.1f} s")
        peak = row.runs[-1].tree_peak
        notes.append(f"sampled anon {peak['anon'] / GIB:.2f} / file {peak['file'] / GIB:.2f} GiB")
        if max(m.max_procs for m in row.runs) > 1:
            notes.append(f"{max(m.max_procs for m in row.runs)} processes")
    return {
        "method": row.method,
        "wall_s": row.wall_s if row.walls else None,
        "walls_s": row.walls,
        "x_floor": row.wall_s / floor_wall if row.walls and floor_wall > 0 else None,
        "peak_rss_gib": row.peak_rss / GIB,
        "runs": [
            {
                "wall_s": m.wall_s,
                "returncode": m.returncode,
                "cpu_s": m.cpu_s,
                "ru_maxrss_bytes": m.ru_maxrss,
                "tree_peak_bytes": m.tree_peak,
                "max_processes": m.max_procs,
                "stderr": str(m.stderr),
            }
            for m in row.runs
        ],
        "error": row.error,
        "command": row.command,
        "notes": "; ".join(notes),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    g = p.add_argument_group("workload")
    g.add_argument("--params", type=float, default=0.5e9, help="model size in parameters")
    g.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="input dtype",
    )
    g.add_argument("--agents", type=int, default=3, help="number of agents N")
    g.add_argument("--density", type=float, default=0.05, help="changed share per agent")
    g.add_argument(
        "--overlap",
        type=float,
        default=0.5,
        help="share of an agent's changes also changed by another",
    )
    g.add_argument("--seed", type=int, default=0, help="generator seed")
    g.add_argument("--shard-size", type=float, default=1.0, help="max shard size in GB (1e9 B)")
    g.add_argument("--workdir", default="/tmp/ram-trl-bench", help="cache for inputs and outputs")
    g.add_argument("--regenerate", action="store_true", help="ignore the cached workload")
    g.add_argument("--generate-only", action="store_true", help="stop after generation")
    r = p.add_argument_group("runs")
    r.add_argument(
        "--methods",
        default="ram,ram#1,ram_plus,ram_plus#1,ram_plus:tensor,task_arithmetic,ties,"
        "ram_plus@store,ram_plus@store#1",
        help="comma list; method[:rho-scope][@store][#threads], e.g. ram_plus:tensor, "
        "ram_plus@store to merge snapshots from a store, ram#1 for one thread ('' = floor only)",
    )
    r.add_argument("--repeat", type=int, default=1, help="runs per command; best wall is kept")
    r.add_argument(
        "--cache",
        choices=["warm", "cold"],
        default="warm",
        help="read every input before each run, or drop the page cache (root only)",
    )
    r.add_argument(
        "--cli",
        default=f"{shlex.quote(sys.executable)} -m ram_trl.cli",
        help="command prefix before 'merge' (default: this python -m ram_trl.cli)",
    )
    r.add_argument("--extra-args", default="", help="appended to every merge command")
    r.add_argument(
        "--no-snapshot", dest="snapshot", action="store_false", help="skip the snapshot row"
    )
    r.add_argument(
        "--mergekit",
        metavar="PYTHON",
        help="an interpreter with mergekit installed: adds mergekit's ram and ramplus_tl rows",
    )
    r.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.agents < 1 or not 0 < args.density < 1 or not 0 <= args.overlap < 1:
        p.error("need --agents >= 1, 0 < --density < 1, 0 <= --overlap < 1")
    if args.agents == 1 and args.overlap:
        p.error("--overlap needs at least 2 agents")
    used = args.density * args.overlap * args.agents / 2 + args.agents * args.density * (
        1 - args.overlap
    )
    if used > 1:
        p.error(f"--density/--overlap/--agents need {used:.2f} > 1 of each tensor")
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.cache == "cold" and not drop_caches_works():
        p.error(f"--cache cold needs a writable {DROP_CACHES} (root on a VM)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--floor-worker"]:
        floor_worker(argv[1:])
        return 0
    if argv[:1] == ["--copy-worker"]:
        copy_worker(argv[1:])
        return 0
    if argv[:1] == ["--generate-worker"]:
        generate_worker(parse_args(argv[1:]))
        return 0
    args = parse_args(argv)
    wl = ensure_workload(args, argv, SCRIPT)
    meas = wl.stamp["measured"]
    log(
        "measured per-agent change density "
        + ", ".join(f"{d:.4f}" for d in meas["density"])
        + f" (target {args.density}); shared share "
        + ", ".join(f"{s:.3f}" for s in meas["shared_share"])
        + f" (target {args.overlap})"
    )
    if args.generate_only:
        return 0

    load_before = os.getloadavg()[0]
    prefix = shlex.split(args.cli)
    extra = shlex.split(args.extra_args)
    if any(m.partition("#")[0].endswith("@store") for m in args.methods.split(",")):
        ensure_store(prefix, wl)  # made before any timing, not inside a row
    floor = floor_command(SCRIPT, wl.base, wl.agents, wl.root / "out-floor")
    rows = [
        Row(
            "floor", floor, "whole command: start-up + read all inputs once -> fp32, write 1 output"
        )
    ]
    run_row(rows[0], wl.root / "out-floor", wl, args)
    startup = Row("start-up", startup_command(), "python -c 'import torch, safetensors'")
    rows.append(run_row(startup, None, wl, args))
    inside = _in_process(rows[0])
    if inside is not None:
        rows.insert(1, Row("floor (in-process)", [], "the floor's own timing, start-up excluded"))
        rows[1].walls = [inside]
    copy = Row("copy base", copy_command(SCRIPT, wl.base, wl.root / "out-copy"),
               "whole command: copy the base unconverted into a new sharded model")  # fmt: skip
    rows.append(run_row(copy, wl.root / "out-copy", wl, args))
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = wl.root / f"out-{spec.replace(':', '-').replace('#', '-t')}"
        row = Row(spec, merge_command(prefix, wl, spec, out, extra), method_args(spec)[1])
        rows.append(run_row(row, out, wl, args))
    if args.snapshot:
        agent = wl.agents[0]
        out = wl.root / "out-snapshot"
        cmd = [*prefix, "snapshot", "--base", str(wl.base), "--model", str(agent), "--store"]
        cmd += [str(out), "--agent", agent.name, "--step", "1"]
        rows.append(
            run_row(Row("snapshot", cmd, f"ram-trl snapshot of {agent.name}"), out, wl, args)
        )
    if args.mergekit:
        for method in ("ram", "ramplus_tl"):
            out = wl.root / f"out-mergekit-{method}"
            row = Row(f"mergekit {method}", mergekit_command(args.mergekit, wl, method, out), "")
            rows.append(run_row(row, out, wl, args))

    floor_wall = rows[0].wall_s
    copy_wall = copy.wall_s
    for row in rows:
        if "@store" in row.method and row.walls and copy.walls:
            row.notes += f"; x copy base {row.wall_s / copy_wall:.2f}"
    report = {
        "workload": {
            **wl.stamp["args"],
            "measured": meas,
            "gen_seconds": wl.stamp["gen_seconds"],
            "gen_peak_rss_gib": wl.stamp.get("gen_peak_rss_gib"),
        },
        "environment": environment(),
        "cache": cache_description(args, wl.input_bytes),
        "repeat": args.repeat,
        "load_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "bench_peak_rss_mib": own_peak_rss() / 2**20,
        "results": [row_to_json(r, floor_wall) for r in rows],
    }
    print(render_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r for r in rows if r.error]
    for r in failed:
        tail = r.runs[-1].stderr.read_text(errors="replace").splitlines()[-40:]
        print(f"\n### {r.method} failed ({r.error})\n", file=sys.stderr)
        print(f"$ {shlex.join(r.command)}", file=sys.stderr)
        print("\n".join(tail), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
