"""The floor every merge is compared to: read every input tensor once, widen it to float32, and
write one output of the base's size. Runs in a fresh interpreter
(``merge_bench.py --floor-worker``), started like the merge commands, so start-up counts too.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

FLOOR_CHUNK_ELEMS = 1 << 24  # 64 MiB of float32 per read; 0.5B-scale layer tensors fit in one


def floor_worker(argv: Sequence[str]) -> None:
    """Read every input tensor once, widen it to float32, and write the base cast back as one
    output: the least I/O and conversion any merge has to do, so merges are compared to it.

    Tensors are visited in base order and, within a tensor, in row chunks across all inputs,
    the way a streaming merge would. Reads go through safetensors' own ``safe_open``, one handle
    per (chunk, input): safetensors serves tensors from an mmap that stays mapped while the
    handle (or any tensor from it) lives, so long-lived handles would count every touched input
    page in RSS. An open costs 0.3-0.8 ms; in A/B runs at 0.5B this was no slower than one
    long-lived handle per file, at 0.5 instead of 4.3 GiB peak RSS. The output goes through
    ram-trl's streaming writer in the base's layout (header first, then the bytes, each shard
    flushed to disk as a merge's are), so the floor's RSS is bounded by a chunk, not a shard.
    """
    parser = argparse.ArgumentParser(prog="merge_bench.py --floor-worker")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--agent", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)

    from safetensors import safe_open

    from ram_trl.io import ModelFolder, ShardedWriter

    started = time.perf_counter()

    folders = [ModelFolder(d) for d in [ns.base, *ns.agent]]  # headers only: which file holds what
    base = folders[0]
    ns.out.mkdir(parents=True, exist_ok=True)
    with ShardedWriter.mirroring(ns.out, base.layout()) as writer:
        for name, info in base.tensors.items():
            shape = info.shape
            rows = shape[0] if shape else 1
            step = max(1, FLOOR_CHUNK_ELEMS // max(1, math.prod(shape[1:])))
            for r0 in range(0, rows, step):
                for k, folder in enumerate(folders):
                    with safe_open(str(folder.tensors[name].file), framework="pt") as f:
                        piece = f.get_slice(name)[r0 : r0 + step] if shape else f.get_tensor(name)
                        widened = piece.float()
                        if k == 0:
                            writer.write(name, widened.to(piece.dtype))
                        del piece, widened
    shutil.copy(ns.base / "config.json", ns.out / "config.json")
    print(f"in-process seconds {time.perf_counter() - started:.3f}", flush=True)


def copy_worker(argv: Sequence[str]) -> None:
    """Copy the base into a new sharded model through ram-trl's writer, unconverted: the least
    any merge writing the base's bytes once must do (what a merge from sparse snapshots is
    compared to)."""
    parser = argparse.ArgumentParser(prog="merge_bench.py --copy-worker")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)

    from ram_trl.io import ModelFolder, ShardedWriter, read_rows, row_chunks

    started = time.perf_counter()
    base = ModelFolder(ns.base)
    ns.out.mkdir(parents=True, exist_ok=True)
    with ShardedWriter.mirroring(ns.out, base.layout()) as writer:
        for name, info in base.tensors.items():
            for start, stop in row_chunks(tuple(info.shape), 1 << 22):
                writer.write(name, read_rows(base, name, start, stop).clone())
    shutil.copy(ns.base / "config.json", ns.out / "config.json")
    print(f"in-process seconds {time.perf_counter() - started:.3f}", flush=True)


def copy_command(script: Path, base: Path, out: Path) -> list[str]:
    return [sys.executable, str(script), "--copy-worker", "--base", str(base), "--out", str(out)]


def startup_command() -> list[str]:
    """What every Python tool here pays before its first byte of work."""
    return [sys.executable, "-c", "import torch, safetensors"]


def floor_command(script: Path, base: Path, agents: Sequence[Path], out: Path) -> list[str]:
    """The benchmark script again, in floor-worker mode, so it starts like the merge commands."""
    cmd = [sys.executable, str(script), "--floor-worker", "--base", str(base)]
    for a in agents:
        cmd += ["--agent", str(a)]
    return [*cmd, "--out", str(out)]
