#!/usr/bin/env python
"""Benchmark ``ram-trl merge`` split across K processes (``torchrun --nproc-per-node K -m
ram_trl merge``, gloo on CPU) against the same merge in one process.

The workload is ``merge_bench.py``'s (a synthetic Qwen2-shaped bf16 base and three sparse
agents, generated once under ``--workdir``; every workload option of ``merge_bench.py`` is
accepted). Each method runs once per process count, in turn, ``--repeat`` times, from a warm page
cache; the table gives the best wall time, the speed-up over one process, the CPU seconds and the
peak RSS summed over the process tree, and checks that every K wrote the same weight files as
one process (sha256 of every ``*.safetensors`` and the index).

Usage::

    .venv/bin/python benchmarks/split_bench.py [--nproc 1,2] [--methods ram_plus,ties]
        [--params 0.5e9] [--repeat 2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this script

import merge_bench  # noqa: E402
from measure import GIB, Measurement, environment, log, measure, prepare_cache  # noqa: E402
from workload import ensure_workload, generate_worker  # noqa: E402

SCRIPT = Path(__file__).resolve()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefix(nproc: int) -> list[str]:
    """The command before ``merge``: one process, or ``torchrun`` with ``nproc`` ranks."""
    if nproc == 1:
        return [sys.executable, "-m", "ram_trl"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return [*torchrun, "--master-port", str(_port()), "-m", "ram_trl"]


def weights_digest(folder: Path) -> str:
    """sha256 over the names and bytes of the weight files and the index."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("model*")):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="comma list of process counts")
    p.add_argument("--methods", default="ram_plus,ties", help="comma list (merge_bench.py's)")
    p.add_argument("--repeat", type=int, default=1, help="runs per command; best wall is kept")
    p.add_argument("--extra-args", default="-q", help="appended to every merge command")
    mine, rest = p.parse_known_args(argv)
    if "--workdir" not in " ".join(rest):
        rest += ["--workdir", "/tmp/ram-trl-split-bench"]
    return mine, rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--generate-worker"]:
        generate_worker(merge_bench.parse_args(argv[1:]))
        return 0
    mine, rest = parse(argv)
    args = merge_bench.parse_args([*rest, "--methods", ""])
    wl = ensure_workload(args, rest, SCRIPT)
    counts = [int(k) for k in mine.nproc.split(",")]
    methods = [m.strip() for m in mine.methods.split(",") if m.strip()]
    extra = shlex.split(mine.extra_args)
    load_before = os.getloadavg()[0]
    results: dict[tuple[str, int], list[Measurement]] = {}
    digests: dict[tuple[str, int], str] = {}
    for method in methods:
        for r in range(mine.repeat):
            for k in counts:  # in turn, so a drift of the machine's speed hits every K alike
                out = wl.root / f"out-split-{method.replace(':', '-')}-{k}"
                cmd = merge_bench.merge_command(prefix(k), wl, method, out, extra)
                prepare_cache("warm", wl.input_files())
                log(f"[{method} x{k}] run {r + 1}/{mine.repeat}: {shlex.join(cmd)}")
                m = measure(cmd, wl.root / "logs", f"split-{method}-{k}")
                if m.returncode != 0:
                    tail = Path(m.stderr).read_text()[-3000:]
                    raise SystemExit(f"{shlex.join(cmd)} exited {m.returncode}:\n{tail}")
                results.setdefault((method, k), []).append(m)
                digests[(method, k)] = weights_digest(out)
                log(f"[{method} x{k}] {m.wall_s:.2f} s, cpu {m.cpu_s:.1f} s")
    load_after = os.getloadavg()[0]
    env = environment()
    shape = wl.stamp["args"]["shape"]
    print("## ram-trl merge split across processes (torchrun, gloo, CPU)\n")
    print(
        f"- model: synthetic Qwen2, {wl.stamp['args']['num_params']:,} params, "
        f"{wl.stamp['args']['dtype']}, hidden {shape['hidden']}, {shape['layers']} layers; "
        f"base + {len(wl.agents)} agents (density {args.density}, overlap {args.overlap})"
    )
    print(
        f"- machine: {env['cpu_count']} CPUs ({env['cpus_usable']} usable), "
        f"{env['mem_total_gib']:.0f} GiB; load average (1 min) before / after: "
        f"{load_before:.2f} / {load_after:.2f}; warm page cache; best of {mine.repeat}\n"
    )
    print("| method | processes | wall s | speed-up | cpu s | peak RSS GiB | same bytes as 1 |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for method in methods:
        one = min(m.wall_s for m in results[(method, counts[0])])
        for k in counts:
            runs = results[(method, k)]
            wall = min(m.wall_s for m in runs)
            rss = max(m.peak_rss for m in runs) / GIB
            cpu = min(m.cpu_s for m in runs)
            same = "yes" if digests[(method, k)] == digests[(method, counts[0])] else "NO"
            print(
                f"| {method} | {k} | {wall:.2f} | {one / wall:.2f} | {cpu:.1f} | {rss:.2f} | "
                f"{same} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
