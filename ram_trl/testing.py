"""Tiny offline models and synthetic sparse agents for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is a character-level ``WordLevel`` tokenizer built in
memory and the models are randomly initialised Qwen2/Llama configurations of about 0.1-1M
parameters. ``transformers`` is imported inside the functions that need it so that importing this
module (and therefore collecting the test-suite) stays fast.

Why synthetic agents: the density of a real RL task vector depends on the learning rate, the step
count and the storage dtype (see the project notes), so tests of RAM's unchanged / unique / shared
logic need deltas whose sparsity pattern is known in advance. :func:`make_sparse_agents` writes such
agents as ordinary Hugging Face checkpoints, tensor by tensor, in the base's dtype and layout.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ram_trl.io import ModelFolder, ShardedWriter, TensorSpec, parse_size
from ram_trl.io.checkpoint import INDEX_NAME
from ram_trl.methods.base import CHANGE_EPSILON

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "CHARS",
    "CHAT_TEMPLATE",
    "CHANGE_THRESHOLD",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "build_tokenizer",
    "make_sparse_agents",
    "save_tiny_base",
    "tiny_config",
]

Arch = Literal["qwen2", "llama"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>")
CHARS: str = "0123456789 +-*=abcdefghijklmnopqrstuvwxyz\n:.,?()[]{}\"'_"
CHAT_TEMPLATE: str = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
#: An element counts as changed when ``|agent - base| > CHANGE_THRESHOLD`` (compared in float32):
#: the paper's threshold, RAM's default ``epsilon``.
CHANGE_THRESHOLD: float = CHANGE_EPSILON

_SMALL_MAGNITUDE = 1e-2  # floor on |w| when sizing a delta, so zero-initialised biases move too


# --------------------------------------------------------------------------------------------
# Tokenizer and models
# --------------------------------------------------------------------------------------------


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the character-level tokenizer (one token per character) with a chat template.

    A hub tokenizer would need a download; this one is built in memory. It is a byte-level BPE
    with no merges, the same kind of tokenizer Qwen2 ships: ``AutoTokenizer.from_pretrained``
    rebuilds a saved Qwen2 folder's tokenizer as ``Qwen2Tokenizer`` (byte-level pre-tokenizer)
    whatever class the folder names, so a plain character vocabulary would come back dropping
    every space. Vocabulary entries are the byte-level spellings of :data:`CHARS` (space is
    ``Ġ``, newline ``Ċ``), which both that rebuild and the tokenizer saved here read alike.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    spelled = [byte_level.pre_tokenize_str(char)[0][0] for char in CHARS]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *spelled])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        # Qwen2/Llama reject token_type_ids in generate(); never produce them.
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    arch: Arch = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    layers: int = 2,
    intermediate_size: int | None = None,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    max_position_embeddings: int = 128,
) -> PretrainedConfig:
    """Return a tiny Qwen2 or Llama config whose vocabulary matches :func:`build_tokenizer`.

    Both architectures are offered because they differ in what the merger must handle: Qwen2 has
    q/k/v biases (zero-initialised, so "unchanged" is common), Llama has none.
    """
    import transformers

    classes = {"qwen2": "Qwen2Config", "llama": "LlamaConfig"}
    if arch not in classes:
        raise ValueError(f"arch must be one of {sorted(classes)}, got {arch!r}")
    config_class = getattr(transformers, classes[arch])  # imports only that architecture
    return config_class(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def build_tiny_model(
    arch: Arch = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_kwargs: Any,
) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM, deterministically from ``seed``.

    ``config_kwargs`` go to :func:`tiny_config` (``hidden_size``, ``layers``, ...).
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, tie_word_embeddings=tie_word_embeddings, **config_kwargs)
    with torch.random.fork_rng(devices=[]):  # do not disturb the caller's global RNG
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def save_tiny_base(
    path: str | Path,
    arch: Arch = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str | None = None,
    seed: int = 0,
    **config_kwargs: Any,
) -> Path:
    """Save a tiny base model, its tokenizer and generation config to ``path``; return the path.

    ``max_shard_size`` (e.g. ``"20KB"``) forces a sharded checkpoint with an index file, which is
    what real 7B checkpoints look like and what a streaming merger must handle.
    """
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(
        arch, tie_word_embeddings=tie_word_embeddings, dtype=dtype, seed=seed, **config_kwargs
    )
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=1, pad_token_id=0, max_new_tokens=16
    )
    kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    build_tokenizer().save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Sparse agents
# --------------------------------------------------------------------------------------------


@dataclass
class _Counts:
    """Per-agent element counts, accumulated over all tensors (float32 comparison)."""

    changed: int = 0
    shared: int = 0
    unique: int = 0


def _generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded by (seed, tensor name): results do not depend on the shard layout."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _stochastic_round(values: Sequence[float], gen: torch.Generator) -> list[int]:
    """Round each value up with probability ``frac(value)``: unbiased, so small tensors keep the
    density on average. One random number serves all values, so equal values round equally
    (agents with equal densities then draw exactly the same number of elements)."""
    u = torch.rand((), generator=gen).item()
    return [math.floor(v + u) for v in values]


def _choose_positions(
    numel: int, densities: Sequence[float], overlap: float, gen: torch.Generator
) -> list[torch.Tensor]:
    """Choose which flat positions each agent changes in one tensor (see make_sparse_agents)."""
    shared_k = _stochastic_round([overlap * d * numel for d in densities], gen)
    unique_k = _stochastic_round([(1.0 - overlap) * d * numel for d in densities], gen)
    perm = torch.randperm(numel, generator=gen)
    pool_size = min(max(shared_k, default=0), numel)
    pool, cursor = perm[:pool_size], pool_size
    chosen = []
    for s, u in zip(shared_k, unique_k, strict=True):
        u = min(u, numel - cursor)  # rounding on tiny tensors can exceed the room left
        private = perm[cursor : cursor + u]
        cursor += u
        from_pool = pool[torch.randperm(pool_size, generator=gen)[: min(s, pool_size)]]
        chosen.append(torch.cat([from_pool, private]))
    return chosen


def _perturb(
    base: torch.Tensor, positions: torch.Tensor, scale: float, gen: torch.Generator
) -> torch.Tensor:
    """Return ``base`` with ``positions`` moved by a random-sign delta that survives the dtype.

    The delta is ``scale * max(|w|, 1e-2) * U[0.5, 1.5)`` with a random sign, so it is relative to
    the element (bf16 rounds away anything below half an ulp, about 0.4% of |w|). Any element that
    still rounds back to the base value has its delta doubled until it changes.
    """
    flat = base.reshape(-1).to(torch.float32)
    w = flat[positions]
    sign = torch.randint(0, 2, w.shape, generator=gen).to(torch.float32) * 2 - 1
    magnitude = (
        scale * w.abs().clamp_min(_SMALL_MAGNITUDE) * (0.5 + torch.rand(w.shape, generator=gen))
    )
    delta = sign * magnitude
    new = (w + delta).to(base.dtype)
    for _ in range(64):
        stuck = new.to(torch.float32) == w
        if not stuck.any():
            break
        delta = torch.where(stuck, delta * 2, delta)
        new = (w + delta).to(base.dtype)
    out = base.reshape(-1).clone()
    out[positions] = new
    return out.reshape(base.shape)


def _resolve_densities(
    names: Sequence[str], density: float | Mapping[str, float] | Sequence[float]
) -> list[float]:
    """Turn a scalar, a per-name mapping or a per-name sequence into one density per agent."""
    if isinstance(density, Mapping):
        missing = [n for n in names if n not in density]
        if missing:
            raise ValueError(f"density mapping lacks agents {missing}")
        values = [float(density[n]) for n in names]
    elif isinstance(density, (int, float)):
        values = [float(density)] * len(names)
    else:
        values = [float(d) for d in density]
        if len(values) != len(names):
            raise ValueError(f"got {len(values)} densities for {len(names)} agents")
    if any(not 0.0 <= d <= 1.0 for d in values):
        raise ValueError(f"densities must lie in [0, 1], got {values}")
    return values


def _check_inputs(names: Sequence[str], densities: Sequence[float], overlap: float) -> None:
    if not names or len(set(names)) != len(names):
        raise ValueError(f"names must be non-empty and distinct, got {list(names)}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must lie in [0, 1], got {overlap}")
    needed = max(overlap * d for d in densities) + sum((1.0 - overlap) * d for d in densities)
    if needed > 1.0:
        raise ValueError(
            f"densities {list(densities)} with overlap {overlap} need {needed:.2f} of every tensor "
            "(shared pool + disjoint private parts); lower the densities or raise the overlap"
        )


def _prepare_agent_dir(path: Path) -> None:
    """Create ``path`` and drop weights left by an earlier run (its layout may have differed)."""
    path.mkdir(parents=True, exist_ok=True)
    for item in path.iterdir():
        if item.is_file() and (item.suffix in (".safetensors", ".tmp") or item.name == INDEX_NAME):
            item.unlink()


def _agent_writer(path: Path, base: ModelFolder, max_shard_size: int | str | None) -> ShardedWriter:
    """A writer of one agent: the base's files and layout, or shards of ``max_shard_size``."""
    if max_shard_size is None:
        return ShardedWriter.mirroring(path, base.layout())
    specs = [TensorSpec(i.name, i.shape, i.dtype) for i in base.tensors.values()]
    return ShardedWriter(path, specs, max_shard_bytes=parse_size(max_shard_size))


def _copy_non_weight_files(base: Path, dest: Path) -> None:
    """Config, generation config, tokenizer...: everything but the weights and their index."""
    for item in base.iterdir():
        if item.is_file() and item.suffix != ".safetensors" and item.name != INDEX_NAME:
            shutil.copy2(item, dest / item.name)


def _count(masks: list[torch.Tensor], counts: list[_Counts]) -> None:
    """Add one tensor's changed / shared / unique element counts to every agent's totals."""
    stacked = torch.stack(masks)
    how_many = stacked.sum(0)
    for mask, c in zip(masks, counts, strict=True):
        c.changed += int(mask.sum())
        c.shared += int((mask & (how_many >= 2)).sum())
        c.unique += int((mask & (how_many == 1)).sum())


def make_sparse_agents(
    base_path: str | Path,
    out_dir: str | Path,
    names: Sequence[str],
    *,
    density: float | Mapping[str, float] | Sequence[float] = 0.05,
    overlap: float = 0.5,
    scale: float = 1e-2,
    seed: int = 0,
    max_shard_size: int | str | None = None,
) -> dict[str, Path]:
    """Write one synthetic RL "agent" per name to ``out_dir/<name>``: base + a sparse delta.

    Exactly what the parameters mean, for every floating-point tensor of ``n`` elements:

    * ``density`` (one value for all agents, or one per agent as a mapping or sequence): agent
      ``a`` changes ``density_a * n`` elements (stochastically rounded, so even tiny tensors keep
      the density on average). Every other element is bit-identical to the base.
    * ``overlap``: ``overlap * density_a * n`` of those elements are drawn (without replacement)
      from a *shared pool* of ``max_a(overlap * density_a) * n`` positions that all agents draw
      from; the other ``(1 - overlap) * density_a * n`` come from a *private* region of the agent
      that no other agent touches. Private elements are therefore always unique to their agent,
      and an agent's pool elements are shared whenever another agent drew them too. With equal
      densities every agent draws the whole pool, so the fraction of each agent's changes that is
      shared is exactly ``overlap``; with unequal densities it is ``overlap`` for the agents that
      do not have the largest pool share and somewhat less for the one that does. ``overlap=0``
      gives disjoint agents (nothing shared), ``overlap=1`` gives no unique elements.
    * ``scale``: the delta of a changed element ``w`` is ``±scale * max(|w|, 1e-2) * U[0.5, 1.5)``
      in float32, then cast to the base's dtype; an element whose change would round away in that
      dtype (bf16) gets a larger delta, so the stored change is real.

    The base is read one tensor at a time (``ram_trl.io.ModelFolder``). Agents keep the base's
    tensor names, dtypes and shard layout (``max_shard_size`` instead re-shards them, to test
    agents whose layout differs from the base's) and a copy of every non-weight file (config,
    generation config, tokenizer). Non-floating tensors are copied unchanged. Results depend only
    on ``seed``, the tensor names and the parameters.

    Also writes ``out_dir/agents.json`` with the densities measured as the fraction of elements
    with ``|agent - base| > 1e-5`` (float32), and each agent's changed / shared / unique counts and
    ``rho = shared / unique`` over the whole model, for cross-checking a merger.

    Returns:
        ``{name: path}`` in the order of ``names``.
    """
    base_path, out_dir = Path(base_path), Path(out_dir)
    names = list(names)
    densities = _resolve_densities(names, density)
    _check_inputs(names, densities, overlap)
    paths = {name: out_dir / name for name in names}
    for p in paths.values():
        _prepare_agent_dir(p)
    counts = [_Counts() for _ in names]
    numel_total = 0
    with ModelFolder(base_path) as base:
        writers = [_agent_writer(paths[n], base, max_shard_size) for n in names]
        for name in base.tensors:
            tensor = base.read(name)
            numel_total += tensor.numel()
            if tensor.is_floating_point() and tensor.numel() > 0:
                gen = _generator(seed, name)
                positions = _choose_positions(tensor.numel(), densities, overlap, gen)
                agent_tensors = [_perturb(tensor, pos, scale, gen) for pos in positions]
            else:
                agent_tensors = [tensor] * len(names)
            base32 = tensor.to(torch.float32)
            masks = [
                ((t.to(torch.float32) - base32).abs() > CHANGE_THRESHOLD) for t in agent_tensors
            ]
            _count([m.reshape(-1) for m in masks], counts)
            for w, t in zip(writers, agent_tensors, strict=True):
                w.write(name, t)
        for w in writers:
            w.close()
    for p in paths.values():
        _copy_non_weight_files(base_path, p)
    _write_report(out_dir, base_path, names, densities, counts, numel_total, overlap, scale, seed)
    return paths


def _write_report(
    out_dir: Path,
    base_path: Path,
    names: Sequence[str],
    densities: Sequence[float],
    counts: Sequence[_Counts],
    numel: int,
    overlap: float,
    scale: float,
    seed: int,
) -> None:
    agents = {}
    for name, target, c in zip(names, densities, counts, strict=True):
        agents[name] = {
            "path": str(out_dir / name),
            "target_density": target,
            "density": c.changed / numel if numel else 0.0,
            "changed": c.changed,
            "shared": c.shared,
            "unique": c.unique,
            "rho": c.shared / c.unique if c.unique else None,
        }
    report = {
        "base": str(base_path),
        "numel": numel,
        "threshold": CHANGE_THRESHOLD,
        "overlap": overlap,
        "scale": scale,
        "seed": seed,
        "agents": agents,
    }
    (out_dir / "agents.json").write_text(json.dumps(report, indent=2) + "\n")
