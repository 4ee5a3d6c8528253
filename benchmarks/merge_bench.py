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

See benchmarks/README.md for what the numbers mean and the targets.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the generated data changes for the same arguments
GIB = 1024**3
EPSILON = 1e-5  # the paper's change threshold: |theta_t - theta_pre| > 1e-5
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
INDEX_NAME = "model.safetensors.index.json"
MARKER = ".merge_bench"  # marks a --workdir as ours, so we may delete things inside it

# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Qwen2Shape:
    """Widths of a Qwen2 decoder; ``layers`` is the only knob scaled to hit ``--params``."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    layers: int
    family: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def embedding_params(self) -> int:
        """Input embedding plus the untied ``lm_head`` plus the final norm."""
        return 2 * self.vocab * self.hidden + self.hidden

    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attn = (h * h + h) + 2 * (kv * h + kv) + h * h  # q (+bias), k, v (+bias), o
        return attn + 3 * h * self.intermediate + 2 * h  # gate, up, down, two norms

    def num_params(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params()


# Widths of real Qwen2/Qwen2.5 checkpoints (plus two small rungs for quick runs) and the layer
# count each ships with. Keeping real widths keeps per-tensor sizes - which drive memory use and
# per-tensor overheads of a streaming merge - realistic; only the depth is scaled.
LADDER: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    # family, hidden, intermediate, heads, kv_heads, vocab, natural layers
    ("tiny", 256, 1408, 4, 2, 16384, 8),
    ("small", 512, 2816, 8, 2, 32768, 12),
    ("Qwen2-0.5B", 896, 4864, 14, 2, 151936, 24),
    ("Qwen2-1.5B", 1536, 8960, 12, 2, 151936, 28),
    ("Qwen2.5-3B", 2048, 11008, 16, 2, 151936, 36),
    ("Qwen2-7B", 3584, 18944, 28, 4, 152064, 28),
)


def pick_shape(params: float) -> Qwen2Shape:
    """Pick the ladder widths whose natural size is nearest ``params`` (in log space), then the
    layer count that gets closest to ``params``.

    Example: 0.5e9 gives Qwen2-0.5B widths with 15 layers (the real model has 24 layers, 0.63B
    parameters with its untied ``lm_head``; 0.49B is the tied count).
    """
    best: Qwen2Shape | None = None
    best_dist = math.inf
    for family, hidden, inter, heads, kv_heads, vocab, natural_layers in LADDER:
        shape = Qwen2Shape(hidden, inter, heads, kv_heads, vocab, natural_layers, family)
        layers = round((params - shape.embedding_params()) / shape.layer_params())
        if layers < 1:
            continue  # the embeddings alone are over budget
        dist = abs(math.log(shape.num_params() / params))
        if dist < best_dist:
            best, best_dist = dataclasses.replace(shape, layers=layers), dist
    if best is None:
        smallest = Qwen2Shape(*LADDER[0][1:6], layers=1, family=LADDER[0][0])
        raise SystemExit(f"--params {params:g} is too small; use at least {smallest.num_params()}")
    return best


def tensor_specs(shape: Qwen2Shape) -> list[tuple[str, tuple[int, ...], str]]:
    """Qwen2ForCausalLM tensor names, shapes and init kind, in ``state_dict`` order."""
    h, kv, inter = shape.hidden, shape.kv_heads * shape.head_dim, shape.intermediate
    specs = [("model.embed_tokens.weight", (shape.vocab, h), "weight")]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "weight"),
            (p + "self_attn.q_proj.bias", (h,), "bias"),
            (p + "self_attn.k_proj.weight", (kv, h), "weight"),
            (p + "self_attn.k_proj.bias", (kv,), "bias"),
            (p + "self_attn.v_proj.weight", (kv, h), "weight"),
            (p + "self_attn.v_proj.bias", (kv,), "bias"),
            (p + "self_attn.o_proj.weight", (h, h), "weight"),
            (p + "mlp.gate_proj.weight", (inter, h), "weight"),
            (p + "mlp.up_proj.weight", (inter, h), "weight"),
            (p + "mlp.down_proj.weight", (h, inter), "weight"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (shape.vocab, h), "weight")]
    return specs


def qwen2_config(shape: Qwen2Shape, dtype: str) -> dict[str, Any]:
    """A config.json that ``transformers.AutoConfig`` accepts as Qwen2."""
    eos = min(151643, shape.vocab - 1)
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": shape.layers,
        "tie_word_embeddings": False,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
    }


# --------------------------------------------------------------------------------------------
# Synthetic workload
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """Where the generated checkpoints live and what they contain."""

    root: Path
    base: Path
    agents: list[Path]
    shape: Qwen2Shape
    stamp: dict[str, Any]

    @property
    def inputs(self) -> list[Path]:
        return [self.base, *self.agents]

    def input_files(self) -> list[Path]:
        return sorted(f for d in self.inputs for f in d.glob("*.safetensors"))


def wanted_stamp(args: argparse.Namespace, shape: Qwen2Shape) -> dict[str, Any]:
    """Everything that determines the generated bytes; a cached workload is reused only if its
    stamp matches this exactly."""
    return {
        "gen_version": GEN_VERSION,
        "shape": dataclasses.asdict(shape),
        "num_params": shape.num_params(),
        "dtype": args.dtype,
        "agents": args.agents,
        "density": args.density,
        "overlap": args.overlap,
        "seed": args.seed,
        "shard_size": args.shard_size,
    }


def workload_for(args: argparse.Namespace) -> Workload:
    """The workload the arguments describe (paths and shape; the stamp is filled in later)."""
    root = Path(args.workdir)
    agents = [root / f"agent{i + 1}" for i in range(args.agents)]
    return Workload(root, root / "base", agents, pick_shape(args.params), {})


def ensure_workload(args: argparse.Namespace, argv: Sequence[str]) -> Workload:
    """Return the cached workload, regenerating it if the stamp or any file is missing/stale.

    Generation runs in a child process (``--generate-worker``) so that this process never
    imports torch or grows: exec hands the parent's peak RSS on to every child's
    ``ru_maxrss``, so a big parent would inflate every later measurement.
    """
    wl = workload_for(args)
    want = wanted_stamp(args, wl.shape)
    stamp_path = wl.root / "workload.json"
    _claim_workdir(wl.root)
    if stamp_path.exists() and not args.regenerate:
        have = json.loads(stamp_path.read_text())
        if have.get("args") == want and all(_checkpoint_complete(d) for d in wl.inputs):
            wl.stamp = have
            log(f"reusing cached workload in {wl.root} (generated in {have['gen_seconds']:.1f} s)")
            return wl
    n_models = args.agents + 1
    log(f"generating {wl.shape.num_params():,} params x {n_models} checkpoints in {wl.root} ...")
    worker = [sys.executable, str(Path(__file__).resolve()), "--generate-worker", *argv]
    m = measure(worker, wl.root / "logs", "generate", stream_stderr=True)
    if m.returncode != 0:
        raise SystemExit(f"generation failed (exit code {m.returncode})")
    wl.stamp = json.loads(stamp_path.read_text())
    wl.stamp["gen_peak_rss_gib"] = m.peak_rss / GIB
    stamp_path.write_text(json.dumps(wl.stamp, indent=2) + "\n")
    log(f"generated in {wl.stamp['gen_seconds']:.1f} s, peak RSS {m.peak_rss / GIB:.2f} GiB")
    return wl


def generate_worker(argv: Sequence[str]) -> None:
    """Child-process side of :func:`ensure_workload`: (re)write the inputs and the stamp."""
    args = parse_args(argv)
    wl = workload_for(args)
    stamp_path = wl.root / "workload.json"
    stamp_path.unlink(missing_ok=True)  # an interrupted generation must not look complete
    for d in [wl.base, *wl.root.glob("agent*")]:
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    stats = generate(wl, args)
    stamp = {
        "args": wanted_stamp(args, wl.shape),
        "gen_seconds": time.perf_counter() - t0,
        "measured": stats,
    }
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")


def _claim_workdir(root: Path) -> None:
    """Refuse a non-empty --workdir that this script did not create: it deletes ``base``,
    ``agent*`` and ``out-*`` folders inside it."""
    root.mkdir(parents=True, exist_ok=True)
    ours = (root / MARKER).exists() or (root / "workload.json").exists()
    if not ours and any(root.iterdir()):
        raise SystemExit(f"--workdir {root} is not empty and not a merge_bench workdir")
    (root / MARKER).touch()


def _checkpoint_complete(folder: Path) -> bool:
    index = folder / INDEX_NAME
    if not index.exists() or not (folder / "config.json").exists():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((folder / s).exists() for s in shards)


def plan_shards(
    specs: Sequence[tuple[str, tuple[int, ...], str]], itemsize: int, max_bytes: int
) -> list[list[int]]:
    """Greedy split into shards of at most ``max_bytes`` (a bigger tensor gets its own shard),
    the way ``save_pretrained`` splits a state dict."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shp, _) in enumerate(specs):
        nbytes = math.prod(shp) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def generate(wl: Workload, args: argparse.Namespace) -> dict[str, Any]:
    """Write the base and agent checkpoints one shard at a time and measure what was written.

    Memory stays bounded by (N + 1) shards plus the float32 temporaries of the largest tensor.
    Every tensor has its own seeded generator, so the data does not depend on the shard plan.
    """
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    specs = tensor_specs(wl.shape)
    shards = plan_shards(specs, itemsize, int(args.shard_size * 1e9))
    n_agents = len(wl.agents)
    counts = {"elements": 0, "changed": [0] * n_agents, "shared": [0] * n_agents, "any": 0}
    config = qwen2_config(wl.shape, args.dtype)
    total_bytes = sum(math.prod(s) for _, s, _ in specs) * itemsize
    for d in wl.inputs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weight_map: dict[str, str] = {}
    for k, members in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        outs: list[dict[str, Any]] = [{} for _ in range(n_agents + 1)]
        for i in members:
            name, shp, kind = specs[i]
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            base = _base_tensor(shp, kind, dtype, gen)
            agents = _agent_tensors(base, n_agents, args.density, args.overlap, gen)
            _count_changes(base, agents, counts)
            outs[0][name] = base
            for a, t in enumerate(agents):
                outs[a + 1][name] = t
            weight_map[name] = fname
        for d, tensors in zip(wl.inputs, outs, strict=True):
            save_file(tensors, str(d / fname), metadata={"format": "pt"})
        log(f"  shard {k + 1}/{len(shards)} written ({len(members)} tensors)")
        del outs
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    for d in wl.inputs:
        (d / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return _summarize_counts(counts, total_bytes)


def _base_tensor(shape: tuple[int, ...], kind: str, dtype: Any, gen: Any) -> Any:
    """Roughly Qwen-like magnitudes: N(0, 0.02) weights, N(0, 0.05) biases, norms near 1."""
    import torch

    t = torch.empty(shape, dtype=torch.float32).normal_(generator=gen)
    if kind == "norm":
        t.mul_(0.1).add_(1.0)
    else:
        t.mul_(0.05 if kind == "bias" else 0.02)
    return t.to(dtype)


def _agent_tensors(base: Any, n_agents: int, density: float, overlap: float, gen: Any) -> list:
    """Base + a sparse perturbation per agent.

    Every element draws u ~ U(0, 1). The first ``s = density * overlap * N / 2`` of the unit
    interval is the shared region: each such element is changed by a random *pair* of agents.
    The next ``N * density * (1 - overlap)`` is split evenly into each agent's unique region.
    So each agent changes ``density`` of the elements, and ``overlap`` of its changes are also
    changed by another agent (RAM's rho = shared/unique = overlap / (1 - overlap)).

    Changes are +-(1..2)% of |w| with an absolute floor of 1e-4: both far above the 1e-5
    change threshold and above bf16's half-ulp (<= 0.4% relative), so no change rounds away.
    """
    import torch

    flat = base.reshape(-1)
    n = flat.numel()
    u = torch.empty(n, dtype=torch.float32).uniform_(generator=gen)
    s = density * overlap * n_agents / 2 if n_agents > 1 else 0.0
    du = density * (1 - overlap) if n_agents > 1 else density
    picked = (u < s + n_agents * du).nonzero().squeeze(1)  # one full pass, then work on ~10%
    u_picked = u[picked]
    del u
    in_shared = u_picked < s
    shared, unique = picked[in_shared], picked[~in_shared]
    owner = ((u_picked[~in_shared] - s) / du).long().clamp_(max=n_agents - 1)
    first = torch.randint(0, max(n_agents, 1), (shared.numel(),), generator=gen)
    offset = torch.randint(1, max(n_agents, 2), (shared.numel(),), generator=gen)
    second = (first + offset) % max(n_agents, 1)
    agents = []
    for a in range(n_agents):
        idx = torch.cat([unique[owner == a], shared[(first == a) | (second == a)]])
        w = flat[idx].float()
        mag = w.abs() * (1e-2 * (1 + torch.rand(idx.numel(), generator=gen)))
        mag.clamp_(min=1e-4)
        sign = torch.randint(0, 2, (idx.numel(),), generator=gen).mul_(2).sub_(1)
        out = flat.clone()
        out[idx] = (w + sign * mag).to(base.dtype)
        agents.append(out.view(base.shape))
    return agents


def _count_changes(base: Any, agents: list, counts: dict[str, Any]) -> None:
    """Count, per agent, elements with |agent - base| > 1e-5 (the paper's mask) and how many of
    those are also changed by another agent - on the stored dtype, after rounding."""
    import torch

    flat = base.reshape(-1)
    int_view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    c = torch.zeros(flat.numel(), dtype=torch.uint8)
    changed = []
    for a in agents:
        a = a.reshape(-1)
        idx = (a.view(int_view) != flat.view(int_view)).nonzero().squeeze(1)
        idx = idx[(a[idx].float() - flat[idx].float()).abs() > EPSILON]
        c[idx] += 1
        changed.append(idx)
    counts["elements"] += flat.numel()
    counts["any"] += int((c > 0).sum())
    for k, idx in enumerate(changed):
        counts["changed"][k] += idx.numel()
        counts["shared"][k] += int((c[idx] >= 2).sum())


def _summarize_counts(counts: dict[str, Any], total_bytes: int) -> dict[str, Any]:
    n = counts["elements"]
    density = [c / n for c in counts["changed"]]
    share = [s / max(c, 1) for s, c in zip(counts["shared"], counts["changed"], strict=True)]
    rho = [s / max(c - s, 1) for s, c in zip(counts["shared"], counts["changed"], strict=True)]
    return {
        "elements": n,
        "bytes_per_input": total_bytes,
        "density": density,
        "shared_share": share,
        "rho": rho,
        "changed_by_any": counts["any"] / n,
    }


# --------------------------------------------------------------------------------------------
# Page cache
# --------------------------------------------------------------------------------------------


def drop_caches_works() -> bool:
    """True if we may write /proc/sys/vm/drop_caches (root on a VM, not in most containers)."""
    return os.access(DROP_CACHES, os.W_OK)


def prepare_cache(mode: str, files: Sequence[Path]) -> None:
    """Put the page cache into the same state before every measurement.

    ``sync`` first so that dirty pages of the previous run's output are not written back during
    the next measurement. ``warm`` then reads every input file once; ``cold`` drops the cache.
    """
    os.sync()
    if mode == "cold":
        DROP_CACHES.write_text("3\n")
        return
    buf = bytearray(16 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


# --------------------------------------------------------------------------------------------
# Measuring a command
# --------------------------------------------------------------------------------------------


class TreeRssSampler(threading.Thread):
    """Periodically sums RSS over a process and all its descendants.

    ``ru_maxrss`` from ``wait4`` covers the child and the descendants it reaped, but as a max
    over processes, not a sum: workers running side by side would be under-reported. Sampling
    the whole tree catches that (but can miss spikes shorter than the interval), so the report
    uses the larger of the two. The anon/file split shows how much is mmapped file pages.

    Kept cheap because it shares the CPUs with the command being measured: the process tree is
    rescanned from /proc only every ``rescan`` samples (~2 ms each) and RSS is read from the
    one-line ``/proc/<pid>/statm`` (~10 us per process): well under 1% of a core.
    """

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self, root_pid: int, interval: float = 0.1, rescan: int = 5) -> None:
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.rescan = root_pid, interval, rescan
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self.max_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        pids: list[int] = []
        n = 0
        while not self._halt.is_set():
            if n % self.rescan == 0:
                pids = self._tree()
            self._sample(pids)
            n += 1
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def _sample(self, pids: list[int]) -> None:
        rss = shared = 0
        for pid in pids:
            statm = _read_proc(f"/proc/{pid}/statm").split()
            if len(statm) >= 3:  # else the process is gone
                rss += int(statm[1]) * self.PAGE
                shared += int(statm[2]) * self.PAGE  # RssFile + RssShmem
        for key, value in (("rss", rss), ("anon", rss - shared), ("file", shared)):
            self.peak[key] = max(self.peak[key], value)
        self.max_procs = max(self.max_procs, len(pids))

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                stat = _read_proc(f"/proc/{entry.name}/stat")
                if stat:
                    ppid = int(stat.rsplit(b")", 1)[1].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        tree, todo = [], [self.root_pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree


def _read_proc(path: str) -> bytes:
    """Raw read of a small /proc file; b"" if the process has gone."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


@dataclasses.dataclass
class Measurement:
    """One timed run of a command."""

    wall_s: float
    returncode: int
    cpu_s: float  # user + system time of the child and the descendants it reaped
    ru_maxrss: int  # bytes, max over the child and the descendants it reaped
    tree_peak: dict[str, int]  # bytes, sampled sums over the live process tree
    max_procs: int
    stdout: Path
    stderr: Path

    @property
    def peak_rss(self) -> int:
        return max(self.ru_maxrss, self.tree_peak["rss"])


def measure(cmd: Sequence[str], logs: Path, label: str, stream_stderr: bool = False) -> Measurement:
    """Run ``cmd`` from the repo root; time it from spawn to reap (so interpreter start-up and
    imports count) and record the peak RSS of its process tree. Output goes to log files, or
    with ``stream_stderr`` both streams go to our stderr (stdout is kept for the report)."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{label}.stdout", logs / f"{label}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        sinks = (sys.stderr, sys.stderr) if stream_stderr else (out, err)
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), cwd=REPO_ROOT, stdout=sinks[0], stderr=sinks[1])
        sampler = TreeRssSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)  # we reaped it ourselves
    return Measurement(
        wall_s=wall,
        returncode=proc.returncode,
        cpu_s=usage.ru_utime + usage.ru_stime,
        ru_maxrss=usage.ru_maxrss * 1024,  # KiB on Linux
        tree_peak=sampler.peak,
        max_procs=sampler.max_procs,
        stdout=out_path,
        stderr=err_path,
    )


# --------------------------------------------------------------------------------------------
# The floor (runs in a fresh interpreter: `merge_bench.py --floor-worker ...`)
# --------------------------------------------------------------------------------------------


FLOOR_CHUNK_ELEMS = 1 << 24  # 64 MiB of float32 per read; 0.5B-scale layer tensors fit in one


def floor_worker(argv: Sequence[str]) -> None:
    """Read every input tensor once, widen it to float32, and write the base cast back as one
    output: the least I/O and conversion any merge has to do, so merges are compared to it.

    Tensors are visited in base order and, within a tensor, in row chunks across all inputs,
    the way a streaming merge would. Each (chunk, input) read opens its own ``safe_open``
    handle: safetensors serves tensors from an mmap that stays mapped while the handle (or any
    tensor from it) lives, so long-lived handles would count every touched input page in RSS.
    The output is streamed (header first, then bytes), so the floor's RSS is bounded by a chunk
    rather than by a shard or the model. An open costs 0.3-0.8 ms; in A/B runs at 0.5B this
    was no slower than one long-lived handle per file, at 0.5 instead of 4.3 GiB peak RSS.
    """
    parser = argparse.ArgumentParser(prog="merge_bench.py --floor-worker")
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--agent", type=Path, action="append", default=[])
    parser.add_argument("--out", type=Path, required=True)
    ns = parser.parse_args(argv)

    from safetensors import safe_open

    inputs = [ns.base, *ns.agent]
    maps = [json.loads((d / INDEX_NAME).read_text())["weight_map"] for d in inputs]
    ns.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in sorted(set(maps[0].values())):
        names = [n for n, s in maps[0].items() if s == shard]
        with safe_open(str(ns.base / shard), framework="pt") as f:
            slices = [(n, f.get_slice(n)) for n in names]
            layout = [(n, sl.get_dtype(), sl.get_shape()) for n, sl in slices]
            del slices
        with SafetensorsStreamWriter(ns.out / shard, layout) as writer:
            for name, _, shape in layout:
                rows = shape[0] if shape else 1
                step = max(1, FLOOR_CHUNK_ELEMS // max(1, math.prod(shape[1:])))
                for r0 in range(0, rows, step):
                    for k, folder in enumerate(inputs):
                        with safe_open(str(folder / maps[k][name]), framework="pt") as f:
                            piece = (
                                f.get_slice(name)[r0 : r0 + step] if shape else f.get_tensor(name)
                            )
                            widened = piece.float()
                            if k == 0:
                                writer.write(widened.to(piece.dtype))
                            del piece, widened
        total += writer.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": maps[0]}
    (ns.out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    shutil.copy(ns.base / "config.json", ns.out / "config.json")


class SafetensorsStreamWriter:
    """Writes a .safetensors file tensor by tensor, in ``layout`` order.

    ``safetensors.torch.save_file`` needs the whole shard in memory; the header only needs
    names, dtypes and shapes, so it can be written first and the data streamed after it.
    """

    ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "BOOL": 1}

    def __init__(self, path: Path, layout: Sequence[tuple[str, str, Sequence[int]]]) -> None:
        import torch

        self._uint8 = torch.uint8
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in layout:
            size = self.ITEMSIZE[dtype] * math.prod(shape)
            header[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data must start 8-byte aligned
        self.nbytes, self.written = offset, 0
        self._file = open(path, "wb")  # noqa: SIM115 - closed in __exit__
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, tensor: Any) -> None:
        data = tensor.contiguous().reshape(-1).view(self._uint8).numpy()
        self._file.write(data)
        self.written += data.nbytes

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()
        if exc[0] is None and self.written != self.nbytes:
            raise RuntimeError(f"wrote {self.written} bytes, header promised {self.nbytes}")


def floor_command(wl: Workload, out: Path) -> list[str]:
    """This script again, in floor-worker mode, so it starts like the merge commands do."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--floor-worker", "--base", str(wl.base)]
    for a in wl.agents:
        cmd += ["--agent", str(a)]
    return [*cmd, "--out", str(out)]


# --------------------------------------------------------------------------------------------
# The merge commands
# --------------------------------------------------------------------------------------------


def method_args(spec: str) -> tuple[list[str], str]:
    """CLI arguments and a note for a ``--methods`` entry such as ``ram_plus``,
    ``ram_plus:tensor`` (method, optionally ``:rho-scope``) or ``ram_plus@store`` (merging the
    agents' task-vector snapshots from a store instead of their checkpoints)."""
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
    return args, ", ".join(notes)


def merge_command(
    prefix: Sequence[str], wl: Workload, spec: str, out: Path, extra: Sequence[str]
) -> list[str]:
    """The full ``ram-trl merge`` command line for one ``--methods`` entry."""
    args, _ = method_args(spec)
    cmd = [*prefix, "merge", "--base", str(wl.base)]
    if spec.endswith("@store"):
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


def run_row(row: Row, out: Path, wl: Workload, args: argparse.Namespace) -> Row:
    """Run one command ``--repeat`` times with the same cache state; keep the best wall time and
    the worst peak RSS."""
    label = out.name
    for r in range(args.repeat):
        shutil.rmtree(out, ignore_errors=True)  # so every run starts without an old output
        prepare_cache(args.cache, wl.input_files())
        log(f"[{row.method}] run {r + 1}/{args.repeat}: {shlex.join(row.command)}")
        m = measure(row.command, wl.root / "logs", label)
        row.runs.append(m)
        if m.returncode != 0:
            row.error = f"exit code {m.returncode}"
        elif not any(out.rglob("*.safetensors")):
            row.error = f"exit code 0 but no *.safetensors under {out}"
        if row.error:
            return row
        row.walls.append(m.wall_s)
        log(f"[{row.method}] {m.wall_s:.2f} s, peak RSS {m.peak_rss / GIB:.2f} GiB")
    return row


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and machine facts for the report header, found without importing torch here
    (see :func:`ensure_workload` for why this process stays small)."""
    from importlib.metadata import PackageNotFoundError, version

    def dist_version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    init = (REPO_ROOT / "ram_trl" / "__init__.py").read_text()
    match = re.search(r"^__version__ = [\"']([^\"']+)", init, re.MULTILINE)
    git = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "torch": dist_version("torch"),
        "safetensors": dist_version("safetensors"),
        "ram_trl": match.group(1) if match else "unknown",
        "git": git or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
        "platform": platform.platform(),
    }


def cache_description(args: argparse.Namespace, wl: Workload) -> str:
    """How the page cache was prepared, stated in the report because it changes every number."""
    input_bytes = len(wl.inputs) * wl.stamp["measured"]["bytes_per_input"]
    can_drop = "writable" if drop_caches_works() else "not writable"
    if args.cache == "cold":
        return f"cold: sync + drop_caches before every measurement ({DROP_CACHES} {can_drop})"
    avail = _mem_available()
    text = (
        f"warm: sync, then every input file read once right before every measurement "
        f"(caches not dropped; {DROP_CACHES} is {can_drop}, so --cache cold is "
        f"{'available' if drop_caches_works() else 'unavailable'})"
    )
    if input_bytes > 0.8 * avail:
        text += f"; WARNING inputs ({input_bytes / GIB:.1f} GiB) may not fit the page cache"
    return text


def _own_peak_rss() -> int:
    """This process's VmHWM in bytes (a lower bound on every child's ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


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


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress goes to stderr so that stdout is only the markdown report."""
    print(msg, file=sys.stderr, flush=True)


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
        default="ram,ram_plus,ram_plus:tensor,task_arithmetic,ties,ram_plus@store",
        help="comma list; method[:rho-scope][@store], e.g. ram_plus:tensor, or ram_plus@store "
        "to merge snapshots from a store ('' = floor only)",
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
    if argv[:1] == ["--generate-worker"]:
        generate_worker(argv[1:])
        return 0
    args = parse_args(argv)
    wl = ensure_workload(args, argv)
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
    rows = [
        Row(
            "floor",
            floor_command(wl, wl.root / "out-floor"),
            "read all inputs once -> fp32, write 1 output",
        )
    ]
    run_row(rows[0], wl.root / "out-floor", wl, args)
    prefix = shlex.split(args.cli)
    extra = shlex.split(args.extra_args)
    for spec in [m.strip() for m in args.methods.split(",") if m.strip()]:
        out = wl.root / f"out-{spec.replace(':', '-')}"
        row = Row(spec, merge_command(prefix, wl, spec, out, extra), method_args(spec)[1])
        rows.append(run_row(row, out, wl, args))

    floor_wall = rows[0].wall_s
    report = {
        "workload": {
            **wl.stamp["args"],
            "measured": meas,
            "gen_seconds": wl.stamp["gen_seconds"],
            "gen_peak_rss_gib": wl.stamp.get("gen_peak_rss_gib"),
        },
        "environment": environment(),
        "cache": cache_description(args, wl),
        "repeat": args.repeat,
        "load_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "bench_peak_rss_mib": _own_peak_rss() / 2**20,
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
