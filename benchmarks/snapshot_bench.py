#!/usr/bin/env python
"""Benchmark task-vector snapshot extraction: time, size on disk and memory.

A synthetic Qwen2-0.5B-shaped base (its real widths; the depth is scaled to ``--params``) and one
agent (base + a sparse perturbation of ``--density``) are generated once and cached under
``--workdir``; no weights are downloaded. A fresh interpreter then

1. fingerprints the base (its cache file is deleted first, so the hash is timed),
2. extracts the snapshot with ``snapshot_folders`` (reusing the fingerprint, as a second snapshot
   of the same base would),
3. reads the agent back through ``TaskVectorSource`` in the engine's row chunks, and the same
   rows from the agent's checkpoint folder for comparison,

and reports each phase's wall time and the process's peak RSS after it. Prints a markdown table.

Usage::

    .venv/bin/python benchmarks/snapshot_bench.py [--params 0.5e9] [--density 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the modules beside this script

from workload import pick_shape, tensor_specs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MB = 1e6


def _peak_rss(reset: bool = False) -> int:
    """This process's peak RSS in bytes (``VmHWM``; not ``ru_maxrss``, which Linux carries over
    from the parent across fork + exec). ``reset`` starts a new peak for the next phase."""
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) * 1024 for line in status.splitlines() if "VmHWM" in line)
    if reset:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    return peak


def _read_all(source: Any) -> None:
    """Read every row chunk and widen it to float32, as the engine does (a checkpoint read is
    a lazy memory-map view: only the conversion touches the bytes)."""
    import torch

    from ram_trl.io import read_rows
    from ram_trl.merging.chunks import row_chunks

    for name, info in source.tensors.items():
        for start, stop in row_chunks(tuple(info.shape)):
            read_rows(source, name, start, stop).to(torch.float32)


def worker(base: Path, agent: Path, out: Path) -> dict[str, Any]:
    """The measured part, in a fresh interpreter."""
    from ram_trl.io import ModelFolder
    from ram_trl.snapshot import TaskVectorSource, fingerprint_folder, snapshot_folders

    result: dict[str, Any] = {"rss_after_imports": _peak_rss(reset=True)}
    t0 = time.perf_counter()
    fingerprint_folder(base)
    t1 = time.perf_counter()
    manifest = snapshot_folders(base, agent, out, agent="agent1", step=0)
    t2 = time.perf_counter()
    result["rss_extraction"] = _peak_rss(reset=True)
    with TaskVectorSource(out, base) as source:
        _read_all(source)
    t3 = time.perf_counter()
    result["rss_read_back"] = _peak_rss(reset=True)
    with ModelFolder(agent) as folder:
        _read_all(folder)
    t4 = time.perf_counter()
    result["rss_read_checkpoint"] = _peak_rss()
    layouts: dict[str, int] = {}
    for e in manifest.tensors.values():
        layouts[e.layout] = layouts.get(e.layout, 0) + 1
    result.update(
        fingerprint_s=t1 - t0,
        extraction_s=t2 - t1,
        read_snapshot_s=t3 - t2,
        read_checkpoint_s=t4 - t3,
        density=manifest.density,
        numel=manifest.numel,
        layouts=layouts,
    )
    return result


def generate(folder: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """Write base/ and agent/ once (reused while ``workload.json`` matches the arguments).

    Agent elements are changed by +-(1..2)% of |w| (at least 1e-3), far above epsilon and above
    bf16's half-ulp, so every chosen element really changes; the rest are bit-identical.
    """
    import torch

    from ram_trl.io import ShardedWriter, TensorSpec

    base, agent, stamp = folder / "base", folder / "agent", folder / "workload.json"
    want = {"version": 2, "params": args.params, "density": args.density, "dtype": args.dtype}
    want["seed"] = args.seed
    if stamp.exists() and json.loads(stamp.read_text()) == want and not args.regenerate:
        return base, agent
    stamp.unlink(missing_ok=True)
    dtype = getattr(torch, args.dtype)
    specs = [(name, shape) for name, shape, _ in tensor_specs(pick_shape(args.params))]
    layout = [TensorSpec(name, shape, dtype) for name, shape in specs]
    writers = []
    for d in (base, agent):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        writers.append(ShardedWriter(d, layout, max_shard_bytes=10**9))
    for i, (name, shape) in enumerate(specs):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        w = torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
        flat = w.reshape(-1)
        pos = (torch.rand(flat.numel(), generator=gen) < args.density).nonzero().squeeze(1)
        old = flat[pos].float()
        step = old.abs().mul_(0.01 + 0.01 * torch.rand(pos.numel(), generator=gen)).clamp_(1e-3)
        sign = torch.randint(0, 2, (pos.numel(),), generator=gen).mul_(2).sub_(1)
        tuned = flat.clone()
        tuned[pos] = (old + sign * step).to(dtype)
        writers[0].write(name, w)
        writers[1].write(name, tuned.view(shape))
    for writer in writers:
        writer.close()
    stamp.write_text(json.dumps(want))
    return base, agent


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(".safetensors"))


def render(args: argparse.Namespace, r: dict[str, Any]) -> str:
    layouts = ", ".join(f"{n} {k}" for k, n in r["layouts"].items())
    lines = [
        f"Snapshot extraction: {r['numel'] / 1e9:.3f}B params, {args.dtype}, target density "
        f"{args.density} (measured {r['density']:.4%}; tensors: {layouts}); "
        f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average before {r['load_before']:.2f}, warm page cache.",
        "",
        "| fingerprint s | extraction s | snapshot MB | checkpoint MB | ratio "
        "| peak RSS MB (after imports / extraction) |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {r['fingerprint_s']:.2f} | {r['extraction_s']:.2f} | {r['snapshot_bytes'] / MB:.1f} "
        f"| {r['checkpoint_bytes'] / MB:.1f} | {r['snapshot_bytes'] / r['checkpoint_bytes']:.2%} "
        f"| {r['rss_after_imports'] / MB:.0f} / {r['rss_extraction'] / MB:.0f} |",
        "",
        f"Reading the whole agent in the engine's row chunks: {r['read_snapshot_s']:.2f} s through "
        f"TaskVectorSource (base rows + scatter; peak RSS {r['rss_read_back'] / MB:.0f} MB) vs "
        f"{r['read_checkpoint_s']:.2f} s from its checkpoint folder (peak RSS "
        f"{r['rss_read_checkpoint'] / MB:.0f} MB).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=0.5e9, help="model size (default 0.5e9)")
    p.add_argument("--density", type=float, default=0.05, help="changed share (default 0.05)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/ram-trl-snapshot-bench", help="cache for inputs")
    p.add_argument("--regenerate", action="store_true", help="ignore the cached workload")
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--worker", nargs=3, metavar=("BASE", "AGENT", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        base, agent, out = map(Path, args.worker)
        print(json.dumps(worker(base, agent, out)))
        return 0
    print(f"preparing the workload in {args.workdir} ...", file=sys.stderr, flush=True)
    base, agent = generate(Path(args.workdir), args)
    out = Path(args.workdir) / "snapshot"
    shutil.rmtree(out, ignore_errors=True)
    (base / ".ram_trl_fingerprint.json").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", str(base), str(agent), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        return done.returncode
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(
        load_before=load_before,
        snapshot_bytes=sum(p.stat().st_size for p in out.iterdir()),
        checkpoint_bytes=folder_bytes(agent),
    )
    print(render(args, result), end="")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
