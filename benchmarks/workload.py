"""The benchmark's synthetic workload: a Qwen2-shaped base and N sparse "agents".

Inputs are generated once per (shape, dtype, agents, density, overlap, seed, shard size) and
cached under the work folder with a stamp (``workload.json``); no weights are downloaded.
Generation runs in a child process (see :func:`ensure_workload`); only that child imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from measure import GIB, log, measure

GEN_VERSION = 2  # bump when the generated data or its files change for the same arguments
EPSILON = 1e-5  # the paper's change threshold: |theta_t - theta_pre| > 1e-5
MARKER = ".merge_bench"  # marks a --workdir as ours, so we may delete things inside it


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

    @property
    def input_bytes(self) -> int:
        return len(self.inputs) * self.stamp["measured"]["bytes_per_input"]


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


def ensure_workload(args: argparse.Namespace, argv: Sequence[str], script: Path) -> Workload:
    """Return the cached workload, regenerating it if the stamp or any file is missing/stale.

    Generation runs in a child process (``script --generate-worker``) so that this process
    never imports torch or grows: exec hands the parent's peak RSS on to every child's
    ``ru_maxrss``, so a big parent would inflate every later measurement.
    """
    wl = workload_for(args)
    want = wanted_stamp(args, wl.shape)
    stamp_path = wl.root / "workload.json"
    _claim_workdir(wl.root)
    if stamp_path.exists() and not args.regenerate:
        have = json.loads(stamp_path.read_text())
        if have.get("args") == want and _complete(wl, have):
            wl.stamp = have
            log(f"reusing cached workload in {wl.root} (generated in {have['gen_seconds']:.1f} s)")
            return wl
    n_models = args.agents + 1
    log(f"generating {wl.shape.num_params():,} params x {n_models} checkpoints in {wl.root} ...")
    worker = [sys.executable, str(script), "--generate-worker", *argv]
    m = measure(worker, wl.root / "logs", "generate", stream_stderr=True)
    if m.returncode != 0:
        raise SystemExit(f"generation failed (exit code {m.returncode})")
    wl.stamp = json.loads(stamp_path.read_text())
    wl.stamp["gen_peak_rss_gib"] = m.peak_rss / GIB
    stamp_path.write_text(json.dumps(wl.stamp, indent=2) + "\n")
    log(f"generated in {wl.stamp['gen_seconds']:.1f} s, peak RSS {m.peak_rss / GIB:.2f} GiB")
    return wl


def generate_worker(args: argparse.Namespace) -> None:
    """Child-process side of :func:`ensure_workload`: (re)write the inputs and the stamp."""
    wl = workload_for(args)
    stamp_path = wl.root / "workload.json"
    stamp_path.unlink(missing_ok=True)  # an interrupted generation must not look complete
    for d in [wl.base, *wl.root.glob("agent*")]:
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    stats, files = generate(wl, args)
    stamp = {
        "args": wanted_stamp(args, wl.shape),
        "gen_seconds": time.perf_counter() - t0,
        "measured": stats,
        "files": files,
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


def _complete(wl: Workload, stamp: dict[str, Any]) -> bool:
    """Every file the stamp says generation wrote is still there, with its size."""
    files = stamp.get("files") or {}
    return bool(files) and all(
        (wl.root / name).is_file() and (wl.root / name).stat().st_size == size
        for name, size in files.items()
    )


def generate(wl: Workload, args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, int]]:
    """Write the base and agent checkpoints tensor by tensor (ram-trl's streaming writer, shards
    of ``--shard-size``) and measure what was written; returns the measurements and the files
    (path under the work folder -> bytes).

    Memory stays at the float32 temporaries of the largest tensor. Every tensor has its own
    seeded generator, so the data does not depend on the shard plan.
    """
    import torch

    from ram_trl.io import ShardedWriter, TensorSpec

    dtype = getattr(torch, args.dtype)
    specs = tensor_specs(wl.shape)
    layout = [TensorSpec(name, shp, dtype) for name, shp, _ in specs]
    n_agents = len(wl.agents)
    counts = {"elements": 0, "changed": [0] * n_agents, "shared": [0] * n_agents, "any": 0}
    config = qwen2_config(wl.shape, args.dtype)
    total_bytes = sum(spec.nbytes for spec in layout)
    writers = []
    for d in wl.inputs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        writers.append(ShardedWriter(d, layout, max_shard_bytes=int(args.shard_size * 1e9)))
    for i, (name, shp, kind) in enumerate(specs):
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
        base = _base_tensor(shp, kind, dtype, gen)
        agents = _agent_tensors(base, n_agents, args.density, args.overlap, gen)
        _count_changes(base, agents, counts)
        for writer, tensor in zip(writers, [base, *agents], strict=True):
            writer.write(name, tensor)
        if i % 50 == 0:
            log(f"  tensor {i + 1}/{len(specs)} written")
    files = {}
    for writer in writers:
        for path in writer.close():
            files[str(path.relative_to(wl.root))] = path.stat().st_size
    return _summarize_counts(counts, total_bytes), files


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
